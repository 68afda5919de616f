"""hpctrain.process.fork_guard: a Popen in one thread (W&B's service start) while another thread forks (the
loader's workers)."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import threading

from hpctrain.process.fork_guard import no_fork_meanwhile


def test_no_child_forked_meanwhile_holds_up_a_guarded_popen() -> None:
    """Forked children that wait until the Popens are over: a child forked during a Popen would inherit the pipe
    Popen waits on and hold it up until the child ends, which here is never (the test fails after 60 s; it does
    without the guard). With the guard, the forks wait for each Popen instead."""
    context = mp.get_context("fork")
    release = context.Event()
    done = threading.Event()

    def spawner() -> None:
        for _ in range(100):
            with no_fork_meanwhile():
                subprocess.Popen(["true"]).wait()
        done.set()

    thread = threading.Thread(target=spawner, daemon=True)
    thread.start()
    children = []
    while not done.is_set() and len(children) < 40:
        child = context.Process(target=release.wait)
        child.start()
        children.append(child)
    finished = done.wait(timeout=60)
    release.set()
    for child in children:
        child.join(timeout=30)
    assert finished, f"a Popen waited for one of {len(children)} children forked meanwhile"
