"""A quicker end for hpctrain's own processes (the commands, local ranks, SLURM tasks, tune workers)."""

from __future__ import annotations

import atexit
import gc


_registered = False


def skip_final_collection() -> None:
    """At exit, move every object into the garbage collector's permanent generation, so that the interpreter's
    last collections do not walk them: a process that imported torch spends about a second of CPU there, on memory
    the operating system takes back anyway (docs/development.md). Only finalizers of objects kept alive by
    reference cycles are skipped, which Python does not promise to run at exit either; atexit handlers, weakref
    finalizers and thread joins all still run, and hpctrain closes its files and processes explicitly."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
