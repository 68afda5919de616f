"""Start `python -m hpctrain.<command>` in the tests without paying for torch's import each time.

Every command the tests start used to be a fresh interpreter, and each spent ~2.3 s of CPU importing torch, its
`torch._dynamo` (imported the first time any optimizer is built) and hpctrain, before doing a few seconds' work:
two thirds of a tiny run. A zygote is one Python per pytest worker that imports all that once and then forks one
child per command. The child becomes what `python -m MODULE ARGS` would be (working directory, environment,
`sys.argv`, `sys.path[0]`, standard streams, fresh random seeds) and runs the module as `__main__` with `runpy`,
as `-m` does; it ends through the interpreter's normal exit (atexit handlers, exit code, traceback). It is a real
process of its own: signals, SIGKILL, its own ranks (forked from a fresh forkserver) and loader workers are as
before.

What is read at start-up or import (PYTHONPATH, thread counts, ...: `IMPORT_ENVIRONMENT`) cannot change after
the fork, so each such environment has a zygote of its own, started with it: a user's environment, with an
installed hpctrain on PYTHONPATH, preloads that hpctrain. A PYTHONPATH entry that holds none of the preloaded
packages (a user's project, with their own package) cannot change what was preloaded, so it does not need a zygote
of its own: the child puts its own PYTHONPATH on `sys.path` in place of the zygote's. Only `-m hpctrain.*` and `-c`
commands go through a zygote; HPCTRAIN_TEST_FRESH=1 sends every command to a fresh interpreter, to check that
nothing depends on it.

Protocol (JSON lines over the zygote's stdin/stdout): {"start": {...}} -> {"pid": N}; {"wait": N, "timeout": S}
-> {"returncode": code or null, "cpu_s": the child's CPU seconds}. The zygote is the children's parent, so it
reaps them and reports exit codes like subprocess does (negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What a fresh interpreter reads at start-up or at import: a child whose environment differs from the zygote's in
# any of these starts fresh (an installed package on PYTHONPATH must not meet the preloaded hpctrain).
IMPORT_ENVIRONMENT = ("HPCTRAIN_TEST_PRELOAD", "PYTHON", "OMP_", "MKL_", "OPENBLAS_", "TORCH", "CUDA", "LD_", "KMP_", "NCCL_", "GLOO_",
                      "VIRTUAL_ENV", "PATH")
PRELOAD = ("torch", "torch._dynamo", "numpy", "h5py", "hydra", "omegaconf", "submitit", "hpctrain.components",
           "hpctrain.config", "hpctrain.launching.job", "hpctrain.launching.slurm", "hpctrain.run.trainer", "hpctrain.predict",
           "hpctrain.export", "hpctrain.test", "hpctrain.inspect", "hpctrain.tune", "hpctrain.tuning.worker",
           "hpctrain.tasks.cbed.model", "hpctrain.tasks.cbed.loss", "hpctrain.tasks.cbed.generator")


def _preload(env: dict[str, str]) -> tuple[str, ...]:
    """PRELOAD and the modules a test adds with HPCTRAIN_TEST_PRELOAD=a,b (heavy imports only its commands make:
    the logger libraries); such a test's commands get a zygote of their own."""
    return (*PRELOAD, *filter(None, env.get("HPCTRAIN_TEST_PRELOAD", "").split(",")))


def _python_path(env: dict[str, str]) -> list[str]:
    return [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]


def _preloads_from(entry: str, env: dict[str, str]) -> bool:
    """Whether a PYTHONPATH entry holds one of the preloaded packages (and so decides what the zygote preloads)."""
    return any((Path(entry) / top).is_dir() or (Path(entry) / f"{top}.py").is_file()
               for top in {name.split(".")[0] for name in _preload(env)})


def _import_environment(env: dict[str, str]) -> dict[str, str]:
    """What a child's zygote must have been started with: the variables read at start-up or import, with only
    the PYTHONPATH entries that hold preloaded packages (a user's project does not need a zygote of its own)."""
    environment = {key: value for key, value in env.items() if key.startswith(IMPORT_ENVIRONMENT)}
    if "PYTHONPATH" in environment:
        environment["PYTHONPATH"] = os.pathsep.join(entry for entry in _python_path(env) if _preloads_from(entry, env))
    return environment


# -- the zygote itself -------------------------------------------------------------------------------------------
def _serve() -> dict[str, Any]:
    """Preload, then answer requests until stdin closes. Returns only in a forked child: its start request."""
    import importlib

    sys.path.pop(0)  # this script's directory (tests/): a child puts its own working directory there
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # stray prints while preloading must not corrupt the replies
    for name in _preload(os.environ):
        importlib.import_module(name)
    replies.write(b'"ready"\n')
    for line in requests:
        request = json.loads(line)
        if "start" in request:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                requests.close()
                replies.close()
                return request["start"]
            replies.write(json.dumps({"pid": pid}).encode() + b"\n")
        elif "wait" in request:
            pid, timeout = request["wait"], request["timeout"]
            if timeout is None:
                done, status, usage = os.wait4(pid, 0)
            else:
                deadline = time.monotonic() + timeout
                while not (reaped := os.wait4(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
                    time.sleep(0.01)
                done, status, usage = reaped
            reply = {"returncode": os.waitstatus_to_exitcode(status) if done else None,
                     # the child's CPU and that of the descendants it waited for (conftest's CPU profile)
                     "cpu_s": usage.ru_utime + usage.ru_stime if done else 0.0}
            replies.write(json.dumps(reply).encode() + b"\n")
    sys.exit(0)


def _become(start: dict[str, Any]) -> None:
    """Turn this forked child into `python -m MODULE ARGS` started in `cwd` with `env`, and run it."""
    import random
    import runpy
    import types

    import importlib

    import numpy as np
    import torch

    zygote_path = {os.path.abspath(entry) for entry in _python_path(os.environ)}
    os.chdir(start["cwd"])
    os.environ.clear()
    os.environ.update(start["env"])
    for fd, path in ((1, start["stdout"]), (2, start["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    module, code, args = start.get("module"), start.get("code"), start["args"]
    sys.argv = [module if code is None else "-c", *args]
    # What -m (the working directory) or -c (the empty entry: the working directory, whatever it becomes) puts
    # first, then the child's own PYTHONPATH where the zygote's was (the same preloading entries)
    sys.path[:] = [os.getcwd() if code is None else "", *(os.path.abspath(entry) for entry in _python_path(os.environ)),
                   *(entry for entry in sys.path if entry not in zygote_path)]
    importlib.invalidate_caches()
    random.seed()
    np.random.seed()
    torch.seed()
    if code is not None:  # as `python -c code`: a fresh __main__ module without a file
        main = types.ModuleType("__main__")
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        exec(compile(code, "<string>", "exec"), main.__dict__)
        return
    sys.modules.pop(module, None)  # runpy runs it afresh as __main__, as -m does
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# -- the tests' side ---------------------------------------------------------------------------------------------
class _Zygote:
    def __init__(self, env: dict[str, str]) -> None:
        # Started as a script, not with -m from the repository: with an installed hpctrain on PYTHONPATH, the
        # repository's own must not be the one preloaded.
        self.process = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        if self._read() != "ready":
            raise RuntimeError("the test zygote did not start")

    def _read(self) -> Any:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the test zygote ended ({self.process.wait()})")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> Any:
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        return self._read()


# CPU seconds of the children reaped so far: they are the zygotes' children, not this process's, so
# RUSAGE_CHILDREN does not count them.
children_cpu_s = 0.0

# One zygote per import environment (the suite's own; a user's, with an installed hpctrain on PYTHONPATH).
_zygotes: dict[tuple, _Zygote] = {}


def processes() -> list[int]:
    """The pids of this process's zygotes that are running."""
    return [zygote.process.pid for zygote in _zygotes.values() if zygote.process.poll() is None]


def eligible(command: list[str]) -> bool:
    if os.environ.get("HPCTRAIN_TEST_FRESH") == "1":
        return False
    if len(command) < 3 or command[0] != sys.executable:
        return False
    return command[1] == "-c" or (command[1] == "-m" and command[2].startswith("hpctrain."))


def _zygote_for(env: dict[str, str]) -> _Zygote:
    key = tuple(sorted(_import_environment(env).items()))
    zygote = _zygotes.get(key)
    if zygote is None or zygote.process.poll() is not None:
        zygote = _zygotes[key] = _Zygote(env)
    return zygote


class Child:
    """The part of subprocess.Popen the tests use, for a child of the zygote. Its output goes to files
    (`stdout`/`stderr`: a path, None for /dev/null, or "stdout" for stderr into stdout's file)."""

    def __init__(self, command: list[str], *, cwd: Path, env: dict[str, str], output: Path | None,
                 merge_stderr: bool) -> None:
        self.zygote = _zygote_for(env)
        self.args, self.returncode, self.output = command, None, output
        if output is None:
            stdout = stderr = os.devnull
        else:
            stdout, stderr = str(output), str(output if merge_stderr else output.with_suffix(".err"))
            for path in {stdout, stderr}:
                Path(path).write_bytes(b"")
        what = {"code" if command[1] == "-c" else "module": command[2]}
        self.pid = self.zygote.ask({"start": {**what, "args": command[3:], "cwd": str(cwd), "env": env,
                                          "stdout": stdout, "stderr": stderr}})["pid"]

    def wait(self, timeout: float | None = None) -> int:
        global children_cpu_s
        if self.returncode is None:
            reply = self.zygote.ask({"wait": self.pid, "timeout": timeout})
            if reply["returncode"] is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = reply["returncode"]
            children_cpu_s += reply["cpu_s"]
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def read_output(self) -> tuple[str, str]:
        if self.output is None:
            return "", ""
        stderr = self.output.with_suffix(".err")
        return self.output.read_text(errors="replace"), stderr.read_text(errors="replace") if stderr.exists() else ""


def start(command: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None,
          output: Path | None = None, merge_stderr: bool = False) -> Child | subprocess.Popen:
    """`command` (a list as for subprocess) started as a child of the zygote where `eligible`, else as a fresh
    process; `output` a file for its stdout (its stderr: the same with merge_stderr, else `.err` beside it)."""
    env = dict(os.environ if env is None else env)
    if eligible(command):
        return Child(command, cwd=cwd, env=env, output=output, merge_stderr=merge_stderr)
    if output is None:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stdout = open(output, "wb")
    stderr = subprocess.STDOUT if merge_stderr else open(output.with_suffix(".err"), "wb")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)


def run(command: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, ...) through the zygote where `eligible`."""
    env = dict(os.environ if env is None else env)
    if not eligible(command):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=check)
    with tempfile.TemporaryDirectory(prefix="hpctrain-zygote-") as folder:
        child = Child(command, cwd=cwd, env=env, output=Path(folder) / "out", merge_stderr=False)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        stdout, stderr = child.read_output()
    result = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    _become(_serve())
