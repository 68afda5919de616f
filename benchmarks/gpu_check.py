"""`bash benchmarks/gpu_check.sh [--out DIR] [--steps N]` (or `python benchmarks/gpu_check.py`): the GPU path checked
end to end on one GPU in a few minutes, with what is installed (it installs nothing). On the demo task (the CBED
distortion task, its synthetic data generated into DIR/data) it

  1. trains in fp32, bf16, fp16 and bf16 compiled (trainer.compile=true) with `python -m hpctrain.launch`: each run
     must end with a finite loss; its loss, samples/s and peak GPU memory are recorded;
  2. SIGKILLs an fp32 run with deterministic kernels (trainer.deterministic=true) once it has checkpointed a
     quarter of its steps, restarts it, and checks that its weights equal the uninterrupted fp32 run's bit for bit;
  3. runs the test phase (`python -m hpctrain.test`) of the fp32 run and, if this hpctrain has `hpctrain.predict`,
     a prediction over the data file, both on the GPU;
  4. prints, alternating, hpctrain's step time against a raw PyTorch loop on the same GPU (one step each in turn,
     harness.interleaved_seconds, benchmarks/harness.py; the target is <= 1.03x) and the loader's samples/s
     against the samples the GPU consumes per second (the raw step on batches already on the GPU; above 1x the
     loader keeps up);
  5. writes everything to DIR/gpu_check.json and exits 1 if a check failed.

Without a CUDA device it says so, writes {"status": "skipped"} and exits 0. `--device cpu` runs the same on the
CPU with a small model (fp16 must then be refused, and bf16 runs only compiled, with torch.compile's eager backend,
not inductor): the dry run that tests this script where there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's hpctrain (as benchmarks/reader.py)
from harness import epochs, interleaved_seconds, loader_rate, quiet, ratio_line, raw_step, step_config  # noqa: E402
from hpctrain.config import Config  # noqa: E402
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler  # noqa: E402
from hpctrain.run.contract import Components  # noqa: E402

RESULT_FILENAME = "gpu_check.json"


@dataclass
class Check:
    """Where the check writes and what it runs: the overrides every run shares, on `device`."""

    out: Path
    device: str
    steps: int
    common: list[str]
    data_file: Path
    compile_override: str
    results: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        print(f"  FAILED: {message}", flush=True)
        self.failures.append(message)


def make_check(out: Path, device: str, steps: int) -> Check:
    data = out / "data"
    if device == "cuda":
        images, size = 2048, 64
        common = ["trainer.device=cuda"]
        compile_override = "trainer.compile=true"
    else:  # the dry run: the test suite's tiny model and data
        images, size = 192, 32
        common = ["trainer.device=cpu", "model.width=8", "model.num_stages=2", "trainer.micro_batch_size=16",
                  "data.num_workers=0"]
        compile_override = "trainer.compile={backend: eager}"
    checkpoint_every = max(1, steps // 8)
    common += [f"paths.data_dir={data}", f"data.prepare.num_images={images}", f"data.prepare.image_size={size}",
               f"trainer.max_steps={steps}", f"trainer.val_every_steps={max(1, steps // 2)}",
               f"callbacks.checkpoint.every_steps={checkpoint_every}", "callbacks.early_stopping.enabled=false",
               "optim.schedule.name=constant", "trainer.progress_bar=false", "task.plot=null",
               "callbacks.metrics.plots=false", "callbacks.metrics.flush_every_seconds=0"]
    return Check(out=out, device=device, steps=steps, common=common, data_file=data / f"cbed_{size}px_{images}.h5",
                 compile_override=compile_override)


def _run(command: list[str], *, timeout: float) -> tuple[int, float, str]:
    """Run a command of this Python; its exit code, seconds and the tail of its output."""
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - started, f"timed out after {timeout:g} s"
    return result.returncode, time.perf_counter() - started, (result.stdout + result.stderr)[-3000:]


def launch(check: Check, name: str, *overrides: str, timeout: float = 300) -> tuple[int, float, str]:
    return _run(["-m", "hpctrain.launch", *check.common, *overrides, f"hydra.run.dir={check.out / 'runs' / name}"],
                timeout=timeout)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What a finished run's metrics.h5 and newest checkpoint say: losses, throughput, GPU memory, weights."""
    from hpctrain.run.checkpoint import CheckpointManager, state_dict_digest
    from hpctrain.run.metrics import open_for_reading

    with open_for_reading(run_dir / "metrics.h5") as file:
        loss = file["train/loss"][()]
        rate = file["train/samples_per_second"][()]
        memory = file["train/max_memory_allocated"][()] if "max_memory_allocated" in file["train"] else None
        validation = file["validation/loss"][()]
    info = CheckpointManager(run_dir, keep_last=2).newest_valid()
    head = max(1, len(loss) // 10)
    return {"steps": int(len(loss)), "loss_first_steps": float(np.mean(loss[:head])),
            "loss_last_steps": float(np.mean(loss[-head:])), "validation_loss": float(validation[-1]),
            "median_samples_per_second": float(np.median(rate[len(rate) // 2:])),
            "max_memory_allocated_bytes": None if memory is None else float(np.nanmax(memory)),
            "model_sha256": None if info is None else state_dict_digest(CheckpointManager.load(info)["model"])}


def check_training(check: Check) -> None:
    print(f"1. training the demo for {check.steps} steps on {check.device}", flush=True)
    variants = {"fp32": ["trainer.precision=fp32", "trainer.deterministic=true"], "bf16": ["trainer.precision=bf16"],
                "fp16": ["trainer.precision=fp16"], "bf16_compiled": ["trainer.precision=bf16", check.compile_override]}
    if check.device != "cuda":  # the dry run: bf16 runs compiled (with the eager backend), to save a run
        del variants["bf16"]
    for name, overrides in variants.items():
        code, seconds, output = launch(check, name, *overrides, timeout=400 if "compiled" in name else 300)
        record: dict[str, Any] = {"exit_code": code, "seconds": round(seconds, 1)}
        check.results.setdefault("runs", {})[name] = record
        if name == "fp16" and check.device != "cuda":
            refused = code == 2 and "fp16 needs a CUDA device" in output
            record["refused_on_cpu"] = refused
            print(f"  fp16 on a CPU: {'refused, as it must be' if refused else 'NOT refused'}", flush=True)
            if not refused:
                check.fail(f"fp16 on a CPU was not refused (exit {code}): {output[-500:]}")
            continue
        if code != 0:
            check.fail(f"the {name} run failed (exit {code}):\n{output}")
            continue
        record.update(run_summary(check.out / "runs" / name))
        memory = record["max_memory_allocated_bytes"]
        print(f"  {name:<14} {seconds:6.1f} s, loss {record['loss_first_steps']:.4g} -> {record['loss_last_steps']:.4g}"
              f", validation {record['validation_loss']:.4g}, {record['median_samples_per_second']:.0f} samples/s"
              + (f", peak GPU memory {memory / 2**20:.0f} MiB" if memory is not None else ""), flush=True)
        if not math.isfinite(record["loss_last_steps"]):
            check.fail(f"the {name} run's loss is not finite: {record['loss_last_steps']}")
        if check.device == "cuda" and memory is None:
            check.fail(f"the {name} run recorded no /train/max_memory_allocated")


def check_resume(check: Check) -> None:
    from hpctrain.run.checkpoint import CheckpointManager

    print("2. fp32, deterministic kernels: SIGKILL mid-run, restart, compare with the uninterrupted run", flush=True)
    name, overrides = "fp32_killed", ["trainer.precision=fp32", "trainer.deterministic=true"]
    run_dir = check.out / "runs" / name
    target = check.steps // 4  # the kill comes within the rest of the run, however fast its steps are
    command = [sys.executable, "-m", "hpctrain.launch", *check.common, *overrides, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manager = CheckpointManager(run_dir, keep_last=2)
    deadline = time.monotonic() + 300
    killed_after = None
    while process.poll() is None and time.monotonic() < deadline:
        steps = [info.step for info in manager.complete()]
        if steps and max(steps) >= target:
            killed_after = max(steps)
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    record: dict[str, Any] = {"killed_after_checkpoint": killed_after}
    check.results["resume"] = record
    if killed_after is None:
        check.fail(f"the run to kill ended (exit {process.returncode}) before its checkpoint of step {target}")
        return
    code, seconds, output = launch(check, name, *overrides)
    record["restart_exit_code"] = code
    if code != 0 or "runs" not in check.results or "model_sha256" not in check.results["runs"].get("fp32", {}):
        check.fail(f"the restart failed (exit {code}) or there is no fp32 reference:\n{output}")
        return
    resumed = run_summary(run_dir)["model_sha256"]
    reference = check.results["runs"]["fp32"]["model_sha256"]
    record["bit_exact"] = resumed == reference
    print(f"  killed after the checkpoint of step {killed_after}, restarted: weights "
          f"{'identical to' if resumed == reference else 'DIFFERENT from'} the uninterrupted run's", flush=True)
    if resumed != reference:
        check.fail(f"SIGKILL + resume is not bit-exact: {resumed} != {reference}")


def check_test_and_predict(check: Check) -> None:
    print("3. the test phase and a prediction of the fp32 run", flush=True)
    run_dir = check.out / "runs" / "fp32"
    code, seconds, output = _run(["-m", "hpctrain.test", str(run_dir), f"data.test_dataset={{path: {check.data_file}}}",
                                  "--checkpoint", "latest", "--name", "gpu_check"], timeout=300)
    check.results["test_phase"] = {"exit_code": code, "seconds": round(seconds, 1)}
    print(f"  python -m hpctrain.test: exit {code} in {seconds:.1f} s", flush=True)
    if code != 0 or not (run_dir / "test" / "gpu_check.h5").exists():
        check.fail(f"the test phase failed (exit {code}):\n{output}")
    if importlib.util.find_spec("hpctrain.predict") is None:
        check.results["predict"] = "hpctrain.predict is not in this hpctrain: not run"
        print("  hpctrain.predict is not in this hpctrain: no prediction", flush=True)
        return
    output_file = check.out / "predictions.h5"
    code, seconds, output = _run(["-m", "hpctrain.predict", str(run_dir), "--input", str(check.data_file),
                                  "--output", str(output_file)], timeout=300)
    check.results["predict"] = {"exit_code": code, "seconds": round(seconds, 1)}
    print(f"  python -m hpctrain.predict: exit {code} in {seconds:.1f} s", flush=True)
    if code != 0 or not output_file.exists():
        check.fail(f"the prediction failed (exit {code}):\n{output}")


def check_speed(check: Check, *, rounds: int, steps: int) -> None:
    """hpctrain's step against a raw loop taking turns on the same device, then the loader against the device."""
    from hpctrain.components import build_components, check_run_inputs
    from hpctrain.launching.app import compose_config

    precision = "bf16" if check.device == "cuda" else "fp32"
    print(f"4. speed ({precision}): hpctrain's step and a raw PyTorch loop on the same {check.device}, taking "
          f"turns; then the loader against what the {check.device} consumes", flush=True)
    config = compose_config([*check.common, f"trainer.precision={precision}"])
    check_run_inputs(config, prepare=False)
    base = step_config(config, steps)
    components = build_components(base)
    split = components.split
    reader = BatchReader(split.train_dataset, transforms=components.transforms, seed=base.seed)
    sampler = DistributedBatchSampler(split.train_indices, micro_batch_size=base.trainer.micro_batch_size,
                                      num_microbatches=1, rank=0, world_size=1, seed=base.seed)
    speed = Speed(base=base, components=components, reader=reader, sampler=sampler,
                  device=torch.device(check.device), precision=precision)
    check_step_speed(check, speed, rounds=rounds, steps=steps)
    check_loader_speed(check, speed, config, rounds=rounds)


@dataclass
class Speed:
    """What both speed comparisons measure with: the step config, its components, the reader and sampler of its
    training split, on `device` in `precision`."""

    base: Config
    components: Components
    reader: BatchReader
    sampler: DistributedBatchSampler
    device: torch.device
    precision: str

    @property
    def pin(self) -> bool:
        return self.device.type == "cuda"


def check_step_speed(check: Check, speed: Speed, *, rounds: int, steps: int) -> None:
    """hpctrain's step and the raw step taking turns, one each, `steps * rounds` times (less the warm-up)."""
    from hpctrain.data.loader import make_loader

    loader = make_loader(speed.reader, speed.sampler, config=speed.base.data, num_workers=0, pin_memory=speed.pin)
    model_name = type(speed.components.model).__name__
    with quiet():
        ours, raw = interleaved_seconds(speed.base, speed.components, epochs(loader, speed.sampler, 10**9),
                                        steps * rounds, check.out / "runs" / "speed", device=speed.device)
    ratio = float(np.median(ours) / np.median(raw))
    print(f"  step, {model_name}, taking turns with the raw loop, {len(ours)} pairs: {ratio:.3f}x (hpctrain "
          f"{np.median(ours) * 1e3:.3f} ms, raw {np.median(raw) * 1e3:.3f} ms per step; target <= 1.03x)",
          flush=True)
    check.results["step"] = {"precision": speed.precision, "pairs": int(len(ours)), "ratio_of_medians": ratio,
                             "hpctrain_median_s": float(np.median(ours)), "raw_median_s": float(np.median(raw)),
                             "target": 1.03}


def check_loader_speed(check: Check, speed: Speed, config: Config, *, rounds: int) -> None:
    """The loader as the run would have it (its automatic worker count, pinned memory on a GPU) against the raw
    step over batches already on the device: the samples per second each can give and take."""
    from hpctrain.data.loader import make_loader, resolve_num_workers, stop_loader_workers
    from hpctrain.process.distributed import available_cpus
    from hpctrain.run.evaluate import autocast_for

    base, device, reader, sampler = speed.base, speed.device, speed.reader, speed.sampler
    workers = resolve_num_workers(config.data, available_cpus(), reader=reader,
                                  indices=speed.components.split.train_indices,
                                  batch_size=base.trainer.micro_batch_size)
    run_loader = make_loader(reader, sampler, config=replace(config.data, persistent_workers=True),
                             num_workers=workers, pin_memory=speed.pin)
    num_batches = max(2, min(40, sampler.steps_per_epoch - 2))
    model = speed.components.model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=base.optim.lr)
    autocast = autocast_for(device, speed.precision)
    on_device = [{name: value.to(device) for name, value in reader[request.indices].items()}
                 for request, _ in zip(sampler, range(num_batches))]

    def consumption_rate() -> float:
        started = time.perf_counter()
        for batch in on_device:
            raw_step(model, optimizer, speed.components.loss, batch, base.task.inputs, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sum(len(batch["index"]) for batch in on_device) / (time.perf_counter() - started)

    consumption_rate()  # warm-up
    loader_rates, device_rates = [], []
    for _ in range(rounds):
        loader_rates.append(loader_rate(run_loader, num_batches))
        device_rates.append(consumption_rate())
    stop_loader_workers()
    print(ratio_line(f"loader ({workers} workers) / {check.device} consumption", loader_rates, device_rates,
                     "samples/s", higher_is_better=True), flush=True)
    check.results["loader"] = {"workers": workers, "loader_samples_per_second": loader_rates,
                               "consumption_samples_per_second": device_rates,
                               "median_ratio": statistics.median(a / b for a, b in zip(loader_rates, device_rates))}


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def write_result(out: Path, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULT_FILENAME
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="work directory (default "
                        "runs/gpu_check); the JSON of results is written there")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    parser.add_argument("--speed-rounds", type=int, default=5, help="rounds of the speed comparisons")
    parser.add_argument("--speed-steps", type=int, default=60, help="step pairs per round of the step comparison")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the small dry run on the CPU that tests this script")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        reason = (f"no CUDA device visible (torch {torch.__version__}, "
                  f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'})")
        print(f"gpu_check: skipped: {reason}", flush=True)
        path = write_result(out, {"status": "skipped", "reason": reason, "environment": environment()})
        print(f"gpu_check: {path}")
        return 0
    if args.steps < 8:
        parser.error(f"--steps must be >= 8, got {args.steps}")
    check = make_check(out, args.device, args.steps)
    print(f"gpu_check on {environment().get('gpu', args.device)}, work directory {out}", flush=True)
    check_training(check)
    check_resume(check)
    check_test_and_predict(check)
    try:
        check_speed(check, rounds=args.speed_rounds, steps=args.speed_steps)
    except Exception as error:  # noqa: BLE001  # a failed measurement is a finding, reported with the rest
        check.fail(f"the speed comparison failed: {type(error).__name__}: {error}")
    status = "failed" if check.failures else "passed"
    result = {"status": status, "device": args.device, "environment": environment(), "steps": args.steps,
              **check.results, "failures": check.failures, "seconds": round(time.perf_counter() - started, 1)}
    path = write_result(out, result)
    print(f"gpu_check: {status} in {result['seconds']:.0f} s"
          + (f", {len(check.failures)} failure(s)" if check.failures else "") + f"; results in {path}", flush=True)
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
