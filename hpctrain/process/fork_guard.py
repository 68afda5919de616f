"""A child process started in a thread must not race a fork in another: `no_fork_meanwhile()` holds a lock that
every fork of this process waits for (os.register_at_fork).

subprocess.Popen waits on a pipe until its child has exec'd; a process forked meanwhile by another thread (a
DataLoader worker, with the fork start method) inherits that pipe's write end and keeps it open until it ends, so
Popen, and the thread that called it, wait that long. W&B starts its service process that way, in the logger's
thread (hpctrain.loggers.wandb), while the training thread forks the loader's workers. Popen itself does not run
the at-fork hooks (only a `preexec_fn` would), so a Popen inside the guard does not wait for it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_lock = threading.Lock()
_installed = False


@contextlib.contextmanager
def no_fork_meanwhile() -> Iterator[None]:
    """Forks of this process (by any thread) wait until the block ends; keep it short and local (no network)."""
    global _installed
    if not _installed:
        os.register_at_fork(before=_acquire, after_in_parent=_release, after_in_child=_reset_in_child)
        _installed = True
    with _lock:
        yield


def _acquire() -> None:
    _lock.acquire()


def _release() -> None:
    _lock.release()


def _reset_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's, held by the fork in this copy
