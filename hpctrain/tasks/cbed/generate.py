"""`python -m hpctrain.tasks.cbed.generate [OVERRIDES]`: write a synthetic CBED dataset of any size to the path
the cbed_distortion task reads (`data.dataset.path`), with the generator settings of its `data.prepare` node.

Takes the same Hydra overrides as the launcher, so the file a run expects is the file this makes, e.g.
    python -m hpctrain.tasks.cbed.generate data.prepare.num_images=200000 data.prepare.image_size=128 \\
        data.dataset.path=/scratch/$USER/cbed_128px_200k.h5 --processes 32
Generation runs in parallel processes, is bit-identical for a given seed whatever their number, and writes to
a temporary file renamed into place only when complete.
"""

from __future__ import annotations

import sys

from hpctrain.tasks.cbed.generator import CBEDGeneratorConfig, generate_dataset
from hpctrain.tasks.generate_command import Generator, main as generate_main

GENERATOR = Generator(task="cbed_distortion", package="hpctrain.tasks.cbed",
                      settings=CBEDGeneratorConfig, generate=generate_dataset,
                      count="num_images", unit="images")


def main(argv: list[str] | None = None) -> int:
    return generate_main(GENERATOR, __doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
