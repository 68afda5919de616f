#!/usr/bin/env python3
"""Smoke test of the local SLURM test cluster started by ``slurm/cluster-up.sh``.

Run it with the project's virtualenv so that the job steps use the same Python::

    .venv/bin/python slurm/smoke_test.py                  # all checks
    .venv/bin/python slurm/smoke_test.py --only submitit  # one or more checks

Each check prints one ``PASS <name>: ...`` or ``FAIL <name>: ...`` line; the last line is
``SMOKE TEST PASSED`` or ``SMOKE TEST FAILED`` and the exit status is 0 only if every
selected check passed.  Checks:

  cluster   sinfo lists node1 and node2 in partition debug, both usable
  srun      ``srun -N2 hostname`` prints node1 and node2
  venv      ``srun -N2 <this python> -c 'import torch, submitit'`` works on both nodes
  sacct     ``sbatch --wrap 'sleep 1'`` finishes and ``sacct`` shows it COMPLETED
  requeue   a ``--requeue`` job requeued with ``scontrol requeue`` runs again
            (its BeginTime is moved on with ``scontrol update StartTime=now``, 2 s after
            it is PENDING again: an immediate restart is refused by slurmd and fails the job)
  usr2      ``scancel --batch --signal=USR2`` reaches a trap in the batch script, and
            ``scancel --signal=USR2`` reaches a trap in an srun step (submitit-style)
  submitit  2-node submitit job: TorchDistributedEnvironment().export(), gloo
            init_process_group, all_reduce; both ranks agree
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Callable

NODES = ("node1", "node2")
PARTITION = "debug"


class CheckFailed(Exception):
    pass


def sh(*cmd: str, timeout: float = 60, check: bool = True) -> str:
    """Run a command; return stdout; raise CheckFailed with stderr on failure."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CheckFailed(f"{' '.join(cmd)!r} timed out after {timeout}s") from e
    except FileNotFoundError as e:
        raise CheckFailed(f"{cmd[0]} not found: is SLURM installed (slurm/cluster-up.sh)?") from e
    if check and p.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)!r} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}")
    return p.stdout


def wait_until(what: str, fn: Callable[[], object], timeout: float, interval: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def job_state(job_id: str) -> str:
    """State from squeue, else from sacct (the allocation line)."""
    out = sh("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()
    if out:
        return out
    out = sh("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).strip().splitlines()
    return out[-1].split()[0] if out else ""


def sbatch(*args: str) -> str:
    return sh("sbatch", "--parsable", f"--partition={PARTITION}", *args).strip().split(";")[0]


def cancel_quietly(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)


# ------------------------------------------------------------------ checks ---
def check_cluster(work: Path) -> str:
    out = sh("sinfo", "-N", "-h", "-p", PARTITION, "-o", "%N %t")
    states = dict(line.split()[:2] for line in out.splitlines() if line.strip())
    bad = {n: states.get(n, "missing") for n in NODES if states.get(n) not in ("idle", "mix", "alloc", "comp")}
    if bad:
        raise CheckFailed(f"nodes not usable: {bad} (sinfo -N: {states})")
    ping = sh("scontrol", "ping").strip()
    return f"{', '.join(f'{n}={states[n]}' for n in NODES)}; {ping}"


def check_srun(work: Path) -> str:
    out = sh("srun", f"--partition={PARTITION}", "-N2", "--ntasks-per-node=1", "hostname", timeout=90)
    hosts = sorted(out.split())
    if hosts != sorted(NODES):
        raise CheckFailed(f"srun -N2 hostname printed {hosts}, expected {list(NODES)}")
    return f"srun -N2 hostname -> {', '.join(hosts)}"


def check_venv(work: Path) -> str:
    code = "import socket, torch, submitit; print(socket.gethostname(), torch.__version__, submitit.__version__)"
    out = sh("srun", f"--partition={PARTITION}", "-N2", "--ntasks-per-node=1", sys.executable, "-c", code, timeout=120)
    lines = sorted(line for line in out.splitlines() if line.strip())
    hosts = sorted(line.split()[0] for line in lines)
    if hosts != sorted(NODES):
        raise CheckFailed(f"expected one line per node, got {lines}")
    return f"{sys.executable}: " + "; ".join(lines)


def check_sacct(work: Path) -> str:
    jid = sbatch(f"--chdir={work}", f"--output={work}/sacct-%j.out", "--wrap", "sleep 1")
    wait_until(f"job {jid} to finish", lambda: job_state(jid) not in ("", "PENDING", "RUNNING", "COMPLETING", "CONFIGURING"), 90)

    def sacct_state() -> str:
        out = sh("sacct", "-n", "-X", "-P", "-j", jid, "-o", "State", check=False).strip()
        return out if out == "COMPLETED" else ""

    try:
        wait_until(f"sacct to report job {jid} COMPLETED", sacct_state, 30)
    except CheckFailed:
        raise CheckFailed(f"sacct -j {jid}: {sh('sacct', '-j', jid, check=False).strip()}") from None
    return f"job {jid}: sacct State=COMPLETED"


def check_requeue(work: Path) -> str:
    log = work / "requeue.log"
    script = work / "requeue.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "restart=${{SLURM_RESTART_COUNT:-0}} host=$(hostname)" >> {log}
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 300; fi
        """))
    jid = sbatch("--requeue", f"--chdir={work}", f"--output={work}/requeue-%j.out", str(script))
    try:
        wait_until("the first run to start", lambda: log.exists() and log.read_text().count("restart=") >= 1, 60)
        sh("scontrol", "requeue", jid)
        # A requeued job is held until its BeginTime (~2 min later); move it on.  Not at once:
        # slurmd refuses to launch a job again within the second its old run was killed
        # ("Job N already killed, do not launch batch job") and the job then ends FAILED.
        wait_until("the job to be pending again", lambda: job_state(jid) == "PENDING", 60)
        time.sleep(2.0)
        wait_until(
            "scontrol update StartTime=now",
            lambda: subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True).returncode == 0,
            30,
        )
        wait_until("the second run", lambda: log.read_text().count("restart=") >= 2, 90)
        wait_until(f"job {jid} to complete", lambda: job_state(jid) == "COMPLETED", 60)
    finally:
        if job_state(jid) in ("PENDING", "RUNNING"):
            cancel_quietly(jid)
    runs = log.read_text().split("\n")
    runs = [r for r in runs if r]
    if not (runs[0].startswith("restart=0") and runs[1].startswith("restart=1")):
        raise CheckFailed(f"unexpected run log: {runs}")
    return f"job {jid} ran twice: {' | '.join(runs)}"


def _signal_job(kind: str, work: Path) -> str:
    """Submit a job with a USR2 trap (batch script or srun step); signal it; return the trap's output."""
    out = work / f"usr2-{kind}.txt"
    body = textwrap.dedent(f"""\
        trap 'echo "USR2 on $(hostname)" >> {out}; exit 0' USR2
        echo ready >> {out}
        for i in $(seq 120); do sleep 1 & wait $!; done
        echo "no signal" >> {out}
        """)
    script = work / f"usr2-{kind}.sh"
    if kind == "batch":
        script.write_text("#!/bin/bash\n" + body)
        scancel = ["scancel", "--batch", "--signal=USR2"]
    else:  # signal handled inside an srun step, as submitit's jobs do
        inner = work / "usr2-step-inner.sh"
        inner.write_text("#!/bin/bash\n" + body)
        inner.chmod(0o755)
        script.write_text(f"#!/bin/bash\nsrun --ntasks=1 {inner}\n")
        scancel = ["scancel", "--signal=USR2"]
    jid = sbatch(f"--chdir={work}", f"--output={work}/usr2-{kind}-%j.out", str(script))
    try:
        wait_until(f"job {jid} to be ready", lambda: out.exists() and "ready" in out.read_text(), 60)
        time.sleep(0.5)
        sh(*scancel, jid)
        wait_until(f"the USR2 trap in job {jid}", lambda: "USR2" in out.read_text(), 20)
        wait_until(f"job {jid} to complete", lambda: job_state(jid) == "COMPLETED", 60)
    finally:
        if job_state(jid) in ("PENDING", "RUNNING"):
            cancel_quietly(jid)
    return f"{' '.join(scancel)} {jid} -> {out.read_text().splitlines()[-1]}"


def check_usr2(work: Path) -> str:
    return f"batch: {_signal_job('batch', work)}; step: {_signal_job('step', work)}"


def _allreduce_task() -> dict:
    """Runs on each rank of the submitit job (pickled by value from __main__)."""
    import datetime
    import os
    import socket

    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    t = torch.tensor([float(env.rank + 1), 10.0 * (env.rank + 1)])
    dist.all_reduce(t)
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, t.tolist())
    dist.destroy_process_group()
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "host": socket.gethostname(),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "sum": t.tolist(),
        "all_sums": gathered,
    }


def check_submitit(work: Path) -> str:
    try:
        import submitit
        import torch  # noqa: F401
    except ImportError as e:
        raise CheckFailed(f"{sys.executable} cannot import torch/submitit ({e}); run with the project's .venv python") from e
    ex = submitit.AutoExecutor(folder=work / "submitit" / "%j")
    ex.update_parameters(slurm_partition=PARTITION, nodes=2, tasks_per_node=1, timeout_min=5, name="hpctrain-smoke")
    job = ex.submit(_allreduce_task)
    try:
        rank0 = job.task(0).result()
        results = job.results()
    except Exception as e:
        cancel_quietly(job.job_id)
        raise CheckFailed(f"job {job.job_id} failed: {e!r}; logs under {work / 'submitit' / job.job_id}") from e
    expect = [1.0 + 2.0, 10.0 + 20.0]
    problems = []
    if sorted(r["rank"] for r in results) != [0, 1]:
        problems.append("ranks are not 0 and 1")
    if sorted(r["host"] for r in results) != sorted(NODES):
        problems.append("the ranks did not run on node1 and node2")
    for r in results:
        if r["sum"] != expect or any(s != expect for s in r["all_sums"]):
            problems.append(f"rank {r['rank']} all_reduce {r['sum']} / gathered {r['all_sums']} != {expect}")
    if rank0 != results[0]:
        problems.append("job.task(0).result() differs from job.results()[0]")
    if problems:
        raise CheckFailed(f"job {job.job_id}: {'; '.join(problems)}; results={results}")
    jid = str(job.job_id)
    wait_until(f"job {jid} to be COMPLETED", lambda: job_state(jid) == "COMPLETED", 60)
    where = ", ".join(f"rank{r['rank']}@{r['host']}" for r in sorted(results, key=lambda r: r["rank"]))
    return f"job {jid}: {where}, MASTER={results[0]['master']}, all_reduce={expect} on both ranks, COMPLETED"


CHECKS: dict[str, Callable[[Path], str]] = {
    "cluster": check_cluster,
    "srun": check_srun,
    "venv": check_venv,
    "sacct": check_sacct,
    "requeue": check_requeue,
    "usr2": check_usr2,
    "submitit": check_submitit,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    ap.add_argument("--workdir", type=Path, help="shared directory for job files (default: a new dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even if everything passed")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hpctrain-slurm-smoke-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    print(f"smoke test: python={sys.executable} workdir={work}", flush=True)
    failed = []
    for name in args.only or list(CHECKS):
        t0 = time.monotonic()
        try:
            detail = CHECKS[name](work)
            print(f"PASS {name} ({time.monotonic() - t0:.1f}s): {detail}", flush=True)
        except CheckFailed as e:
            failed.append(name)
            print(f"FAIL {name} ({time.monotonic() - t0:.1f}s): {e}", flush=True)
        except Exception as e:  # a bug in the check itself, still a failure
            failed.append(name)
            print(f"FAIL {name} ({time.monotonic() - t0:.1f}s): unexpected {e!r}", flush=True)
            traceback.print_exc()
    if failed:
        print(f"SMOKE TEST FAILED: {', '.join(failed)} (job files kept in {work})")
        return 1
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print("SMOKE TEST PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
