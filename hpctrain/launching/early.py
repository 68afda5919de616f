"""Local ranks started early: the forkserver that `launcher.num_processes` > 1 local ranks fork from imports torch
and hpctrain's training modules, seconds of CPU. Started as soon as the launcher knows it will need it, those
imports run on another core while the launcher imports and composes the run, instead of after; the preflight's
checks then run in a process forked from it too (hpctrain.launching.job.check_in_rank_process).

The launcher knows at two moments: from the command line (hpctrain.launch, before its own imports), when it names
`launcher.num_processes=N`; otherwise once the composed config says so (the preflight). Only speed depends on
either: the ranks take the launcher's environment as it is when they start (hpctrain.launching.job), and import
what their forkserver did not. This module imports only the standard library and hpctrain.process.forkserver.
"""

from __future__ import annotations

import re
from typing import Sequence

from hpctrain.process.forkserver import start_forkserver

# What a local training rank runs (hpctrain.launching.job.run_rank), preloaded by its forkserver.
RANK_MODULES = ("hpctrain.launching.job", "hpctrain.components", "hpctrain.run.trainer")
_NUM_PROCESSES = re.compile(r"\+{0,2}launcher\.num_processes=(\d+)")


def asks_for_local_ranks(argv: Sequence[str]) -> bool:
    """Whether a command line asks for several local ranks in a single run: `launcher.num_processes=N` with N > 1,
    no other launcher, and no Hydra flag (-m, --cfg, --help, ...)."""
    if any(arg.startswith("-") or (arg.startswith("launcher=") and arg != "launcher=local") for arg in argv):
        return False
    return any((match := _NUM_PROCESSES.fullmatch(arg)) is not None and int(match.group(1)) > 1 for arg in argv)


def start_rank_forkserver() -> None:
    """Start the local ranks' forkserver now (a no-op if it runs already)."""
    start_forkserver(*RANK_MODULES)
