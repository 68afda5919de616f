"""`python -m hpctrain.tasks.density.generate [OVERRIDES]`: write a synthetic density-reversion dataset of any size
to the path the density_reversion task reads (`data.dataset.path`), with the generator settings of its
`data.prepare` node.

Takes the same Hydra overrides as the launcher (`task=density_reversion` is implied), so the file a run expects is
the file this makes, e.g.
    python -m hpctrain.tasks.density.generate data.prepare.num_samples=100000 data.prepare.image_size=64 \\
        data.dataset.path=/scratch/$USER/density_64px_100k.h5 --processes 16
Generation is bit-identical for a given seed whatever the number of processes, and writes to a temporary file
renamed into place only when complete.
"""

from __future__ import annotations

import sys

from hpctrain.tasks.density.generator import DensityGeneratorConfig, generate_dataset
from hpctrain.tasks.generate_command import Generator, main as generate_main

GENERATOR = Generator(task="density_reversion", package="hpctrain.tasks.density",
                      settings=DensityGeneratorConfig, generate=generate_dataset,
                      count="num_samples", unit="samples")


def main(argv: list[str] | None = None) -> int:
    return generate_main(GENERATOR, __doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
