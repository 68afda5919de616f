"""How this machine's own processes (local ranks, local tune workers, predict and test ranks) start: forked from a
forkserver that has imported torch and the modules they run once, not each spawned as a fresh interpreter
spending seconds of CPU on those imports.

The forkserver is a fresh single-threaded process without CUDA (what is safe to fork), started by the first
process of its context or by `start_forkserver`; the processes' parent is the forkserver, which lives until the
process that started it and every process it forked have ended. Each forked process therefore ends itself when
the process that started it ends (`end_with_starter`). This module imports only the standard library, so that
the launcher can start the forkserver before it imports torch itself (hpctrain.launching.early).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from multiprocessing import forkserver
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext

# Preloaded for every process: torch, and torch._dynamo, which torch.optim's first optimizer imports (1-2 s of CPU).
PRELOAD = ("torch", "torch._dynamo")


def preloaded_forkserver(*modules: str) -> BaseContext:
    """The forkserver context, whose server (if this call starts it first) preloads PRELOAD and `modules`; a
    missing module is skipped by the forkserver, not an error. A server already running keeps what it preloaded:
    the processes import what they lack themselves."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, *(name for name in modules if name not in PRELOAD)])
    return context


def start_forkserver(*modules: str) -> None:
    """Start the forkserver now (it preloads PRELOAD and `modules`), so that its imports run while this process
    does other work; a no-op if it runs already."""
    preloaded_forkserver(*modules)
    forkserver.ensure_running()


def end_with_starter() -> None:
    """In a process forked from the forkserver: be SIGKILLed as soon as the process that started it ends (a killed
    launcher must take its ranks with it; they would go on training and hold the run's lock). The kernel's
    parent-death signal cannot do it: the parent is the forkserver, which lives as long as any process it forked
    (each holds its alive pipe). multiprocessing keeps a pipe to the starter that closes when the starter ends:
    `parent_process().sentinel`, which a daemon thread waits on. Its own children end as with any parent that
    dies (loader workers by their parent-death signal, the plot process at the end of its pipe)."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="hpctrain-starter-watch", daemon=True).start()
