"""Using what a run learned, as a user would: the outside package (tests/outside, against the non-editable install
of tests/test_own_model.py) trained once, then loaded in Python (hpctrain.load_model / load_run), predicted over
other files on 1 and 2 ranks, after a kill, and as a SLURM job (hpctrain.predict), tested with --save-outputs,
fine-tuned from (trainer.init_from) and exported (hpctrain.export); and the CBED task's export round trip."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.config import ConfigError

from . import zygote
from .conftest import PYTHON, final_weights, kill_after_checkpoint, launch, tiny_overrides
from .test_own_model import (SHORT, installed, make_project, shares_the_install, user_env,  # noqa: F401
                             user_inspect, user_launch)

LABELLED_SIZE = 37  # another size than the training file's 160


@dataclass(frozen=True)
class Trained:
    installed: Path
    project: Path
    run_dir: Path
    other: Path  # 37 molecules, with energies
    unlabelled: Path  # the same without energies


# The tests that read the trained run share it, and with it tests/test_own_model.py's install and the zygote of its
# user environment: they join that file's xdist group, so that one worker installs and trains once for all of them
# (the SLURM tests, in the SLURM group, train their own).
@pytest.fixture(scope="module")
def trained(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:  # noqa: F811
    """One short run of the outside task, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("model_use")
    project = make_project(root / "project")
    sys.path.insert(0, str(project))
    try:
        import molecules

        other = molecules.make_file(project / "other.h5", num_molecules=LABELLED_SIZE, seed=3)
        unlabelled = molecules.make_file(project / "unlabelled.h5", num_molecules=LABELLED_SIZE, seed=3)
        with h5py.File(unlabelled, "a") as file:
            del file["targets"]
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("molecules", None)
    run_dir = root / "run"
    user_launch(installed, project, *SHORT, run_dir=run_dir)
    return Trained(installed, project, run_dir, other, unlabelled)


def user_tool(trained: Trained, module: str, *args: str, check: bool = True, cwd: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", f"hpctrain.{module}", *map(str, args)]
    result = zygote.run(command, cwd=cwd or trained.project, env=user_env(trained.installed, trained.project),
                        timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def contents(path: Path) -> dict:
    """Every dataset (values and dtype) and attribute of an HDF5 file."""
    found: dict = {"attrs": {}}
    with h5py.File(path, "r") as file:
        def visit(name: str, item: object) -> None:
            if isinstance(item, h5py.Dataset):
                found[name] = (item.dtype.str, item[()].tobytes(), item.shape)
            found["attrs"][name] = dict(item.attrs)  # type: ignore[attr-defined]
        file.visititems(visit)
        found["attrs"]["/"] = dict(file.attrs)
    return found


def assert_same_content(a: Path, b: Path) -> None:
    first, second = contents(a), contents(b)
    assert sorted(first) == sorted(second)
    for name in first:
        if name != "attrs":
            assert first[name] == second[name], name
    assert json.dumps(first["attrs"], default=str, sort_keys=True) == json.dumps(second["attrs"], default=str,
                                                                                  sort_keys=True)


LOAD_AND_VALIDATE = """
import json, sys
import h5py, numpy as np, torch
import hpctrain
from hpctrain.data.dataset import BatchReader

run_dir, data = sys.argv[1], sys.argv[2]
model = hpctrain.load_model(run_dir)
run = hpctrain.load_run(run_dir, overrides=[f"data.dataset.path={data}"])  # the run's relative path moved
config, components = run.config, run.components
split = components.split
reader = BatchReader(split.val_dataset, transforms=components.transforms, seed=config.seed, stage="validation")
errors = []
with torch.no_grad():
    for start in range(0, len(split.val_indices), config.trainer.micro_batch_size):  # the trainer's batches
        batch = reader[split.val_indices[start:start + config.trainer.micro_batch_size]]
        outputs = model(*[batch[name] for name in config.task.inputs])
        errors.append(components.metrics["absolute_error"](outputs, batch).numpy())
with h5py.File(f"{run_dir}/metrics.h5", "r") as file:
    row = list(file["validation/step"][()]).index(run.checkpoint.step)
    expected = file["validation/per_sample/absolute_error"][row]
    index = file["validation/sample_index"][()]
print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}", "training": model.training,
                  "hpctrain": hpctrain.__file__, "step": run.checkpoint.step,
                  "steps": [info.step for info in run.checkpoints], "index": index.tolist(),
                  "val_index": split.val_indices.tolist(), "loaded": np.concatenate(errors).astype(np.float32).tolist(),
                  "trained": expected.tolist()}))
"""


@shares_the_install
@pytest.mark.slow
def test_load_model_reproduces_the_validation_of_training_from_another_directory(trained: Trained,
                                                                                 tmp_path: Path) -> None:
    command = [PYTHON, "-c", LOAD_AND_VALIDATE, str(trained.run_dir), str(trained.project / "molecules.h5")]
    found = json.loads(zygote.run(command, cwd=tmp_path, env=user_env(trained.installed, trained.project),
                                  check=True).stdout)
    assert found["class"] == "molecules.EnergyNet" and found["training"] is False
    assert found["hpctrain"].startswith(str(trained.installed))
    assert found["step"] == 24 and found["steps"][0] == 24  # best = the last evaluation here
    assert found["index"] == found["val_index"]
    np.testing.assert_array_equal(np.array(found["loaded"], dtype=np.float32),
                                  np.array(found["trained"], dtype=np.float32))


@shares_the_install
@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused_with_its_file_named(trained: Trained, tmp_path: Path) -> None:
    import shutil

    from hpctrain.use.runs import load_model

    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    newest = CheckpointManager(run_dir, keep_last=2).complete()[0]
    data = bytearray(newest.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"checkpoint {newest.path} is unusable: CRC-32 does not match"):
        load_model(run_dir, checkpoint=newest.step)


@shares_the_install
@pytest.mark.slow
def test_predict_on_one_and_two_ranks_writes_the_same_file(trained: Trained, tmp_path: Path) -> None:
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    common = ["--input", trained.unlabelled, "--inputs-only", "--chunk-size", 5]
    user_tool(trained, "predict", trained.run_dir, *common, "--output", one)
    result = user_tool(trained, "predict", trained.run_dir, *common, "--output", two, "--num-processes", 2)
    assert f"predictions of {LABELLED_SIZE} samples by step 24" in result.stdout
    assert_same_content(one, two)
    assert not (tmp_path / "one.h5.parts").exists() and not (tmp_path / "two.h5.parts").exists()
    with h5py.File(one, "r") as file:
        predicted = file["outputs/output"][()]
        assert file["sample_index"][()].tolist() == list(range(LABELLED_SIZE))
        assert file["outputs/output"].chunks is not None
        info = CheckpointManager(trained.run_dir, keep_last=2).complete()[0]
        assert file.attrs["checkpoint_step"] == 24
        assert file.attrs["checkpoint_sha256"] == hashlib.sha256(info.path.read_bytes()).hexdigest()
        assert json.loads(file.attrs["config"])["task"]["name"] == "molecules"
    # Any dataset node: here the built-in one, written out whole.
    node = (f"{{_target_: hpctrain.data.HDF5Dataset, path: {trained.unlabelled}, fields: {{positions: {{values: "
            f"atoms/positions, offsets: atoms/offsets}}, descriptors: molecule/descriptors}}}}")
    user_tool(trained, "predict", trained.run_dir, "--dataset", node, "--chunk-size", 5,  # the same batches
              "--output", tmp_path / "node.h5")
    with h5py.File(tmp_path / "node.h5", "r") as file:
        np.testing.assert_array_equal(file["outputs/output"][()], predicted)
    # The same values as the model loaded in Python, on the same samples.
    sys.path.insert(0, str(trained.project))
    try:
        from hpctrain.data.dataset import HDF5Dataset
        from hpctrain.use.runs import load_model

        model = load_model(trained.run_dir)
        batch = HDF5Dataset(trained.unlabelled, {"positions": {"values": "atoms/positions",
                                                              "offsets": "atoms/offsets"},
                                                "descriptors": "molecule/descriptors"}).__getitems__(range(5))
        with torch.no_grad():
            direct = model(batch["positions"], batch["positions_length"], batch["descriptors"]).numpy()
    finally:
        sys.path.remove(str(trained.project))
        sys.modules.pop("molecules", None)
    np.testing.assert_array_equal(predicted[:5], direct)

    # A SLURM attempt requeued in the moment the file was completed starts again: it finds the file complete.
    from hpctrain.use.predict import dataset_node, holds_result, make_plan, predict_rank
    from hpctrain.use.runs import load_run

    sys.path.insert(0, str(trained.project))
    try:
        run = load_run(trained.run_dir)
        node = dataset_node(run.config, input_path=trained.unlabelled, node_text=None, inputs_only=True)
        plan = make_plan(run, node, output=one, batch_size=8, chunk_size=5, seed=run.config.seed, stage="predict")
    finally:
        sys.path.remove(str(trained.project))
        sys.modules.pop("molecules", None)
    assert holds_result(plan)
    before = one.stat().st_mtime_ns
    predict_rank(run.config, trained.run_dir, json.dumps(dataclasses.asdict(plan)))
    assert one.stat().st_mtime_ns == before and not plan.work_dir.exists()


@shares_the_install
@pytest.mark.slow
def test_predict_writes_ragged_outputs_in_the_layout_hpctrain_reads(trained: Trained, tmp_path: Path) -> None:
    output = tmp_path / "ragged.h5"
    user_tool(trained, "predict", trained.run_dir, "model._target_=molecules.PerAtomEnergies", "--input",
              trained.other, "--chunk-size", 5, "--batch-size", 3, "--num-processes", 2, "--output", output)
    from hpctrain.data.dataset import HDF5Dataset

    predicted = HDF5Dataset(output, {"per_atom": {"values": "outputs/per_atom/values",
                                                  "offsets": "outputs/per_atom/offsets"},
                                     "energy": "outputs/energy"}).__getitems__(range(LABELLED_SIZE))
    with h5py.File(trained.other, "r") as file:
        atoms_per_molecule = np.diff(file["atoms/offsets"][()])
    assert predicted["per_atom_length"].tolist() == atoms_per_molecule.tolist()
    with h5py.File(output, "r") as file:
        assert sorted(file["outputs"]) == ["energy", "per_atom"]  # the lengths are the offsets
    # Each molecule's energy is its atoms' sum plus the descriptor term: the rows belong to the right molecules.
    sys.path.insert(0, str(trained.project))
    try:
        from hpctrain.use.runs import load_model

        model = load_model(trained.run_dir)
        with h5py.File(trained.other, "r") as file, torch.no_grad():
            descriptors = model.descriptors(torch.from_numpy(file["molecule/descriptors"][()])).squeeze(-1)
    finally:
        sys.path.remove(str(trained.project))
        sys.modules.pop("molecules", None)
    np.testing.assert_allclose(predicted["per_atom"].sum(dim=1) + descriptors, predicted["energy"], rtol=1e-5,
                               atol=1e-6)


@shares_the_install
@pytest.mark.slow
def test_predict_killed_mid_way_continues_and_gives_the_same_file(trained: Trained, tmp_path: Path) -> None:
    sys.path.insert(0, str(trained.project))
    try:
        import molecules

        big = molecules.make_file(tmp_path / "big.h5", num_molecules=3000, seed=5)
    finally:
        sys.path.remove(str(trained.project))
        sys.modules.pop("molecules", None)
    common = ["--input", big, "--chunk-size", 16]
    reference = tmp_path / "reference.h5"
    user_tool(trained, "predict", trained.run_dir, *common, "--output", reference)

    output = tmp_path / "interrupted.h5"
    parts = tmp_path / "interrupted.h5.parts"
    process = zygote.start([PYTHON, "-m", "hpctrain.predict", str(trained.run_dir), *map(str, common), "--output",
                            str(output)], cwd=trained.project, env=user_env(trained.installed, trained.project))
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline and len(list(parts.glob("chunk_*.json"))) < 4:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists(), "the prediction ended before it could be killed; make it longer"
    kept = sorted(parts.glob("chunk_*.json"))
    assert len(kept) >= 4
    damaged = kept[1].with_suffix(".h5")
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # a kept chunk damaged meanwhile: found out and computed again
    damaged.write_bytes(bytes(data))

    # Continued on 2 ranks with a loader worker each: how it runs is not what it computes.
    result = user_tool(trained, "predict", trained.run_dir, *common, "--output", output, "--num-processes", 2,
                       "data.num_workers=1")
    log = result.stdout + result.stderr
    assert f"{damaged.stem} in {parts} is incomplete or corrupt" in log
    found = re.search(r"rank 0: (\d+) of its (\d+) chunks to compute \((\d+) kept", log)
    todo, mine, kept_now = map(int, found.groups())
    assert kept_now >= len(kept) - 1 and todo == mine - kept_now  # all it found intact, the damaged one again
    assert_same_content(output, reference)
    assert not parts.exists()


@shares_the_install
@pytest.mark.slow
def test_predict_refuses_bad_input_in_one_line_and_writes_nothing(trained: Trained, tmp_path: Path) -> None:
    output = tmp_path / "out" / "p.h5"
    for args, message in [
            (["--input", tmp_path / "missing.h5"], f"--input: {tmp_path / 'missing.h5'} does not exist"),
            (["--input", trained.unlabelled], "data.dataset: field 'energy': "),
            (["--checkpoint", "7"], "has no checkpoint of step 7")]:
        result = user_tool(trained, "predict", trained.run_dir, *args, "--output", output, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


@shares_the_install
@pytest.mark.slow
def test_the_test_phase_keeps_the_outputs_it_scored(trained: Trained) -> None:
    user_tool(trained, "test", trained.run_dir, "data.test_dataset={path: other.h5}", "--name", "other",
              "--save-outputs")
    with h5py.File(trained.run_dir / "test" / "other.outputs.h5", "r") as outputs, \
            h5py.File(trained.run_dir / "test" / "other.h5", "r") as test, h5py.File(trained.other, "r") as data:
        assert outputs.attrs["stage"] == "test"
        error = np.abs(outputs["outputs/output"][()] - data["targets/energy"][()])
        np.testing.assert_allclose(error, test["test/per_sample/absolute_error"][()], rtol=1e-6)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_predict_as_a_slurm_job_writes_the_same_file(trained: Trained, tmp_path: Path) -> None:
    common = ["--input", trained.other, "--chunk-size", 5]
    user_tool(trained, "predict", trained.run_dir, *common, "--output", tmp_path / "local.h5")
    result = user_tool(trained, "predict", trained.run_dir, *common, "--output", tmp_path / "slurm.h5", "--slurm",
                       "launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
                       "launcher.timeout_min=10", timeout=600)
    assert "submitted SLURM prediction job" in result.stdout
    assert_same_content(tmp_path / "local.h5", tmp_path / "slurm.h5")


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_requeued_slurm_prediction_continues_and_gives_the_same_file(trained: Trained, tmp_path: Path) -> None:
    from .test_slurm import allocations, release_when_requeued, sh, wait_until

    sys.path.insert(0, str(trained.project))
    try:
        import molecules

        big = molecules.make_file(tmp_path / "big.h5", num_molecules=12000, seed=6)
    finally:
        sys.path.remove(str(trained.project))
        sys.modules.pop("molecules", None)
    common = ["--input", big, "--chunk-size", 16]
    user_tool(trained, "predict", trained.run_dir, *common, "--output", tmp_path / "local.h5")
    output, parts = tmp_path / "slurm" / "requeued.h5", tmp_path / "slurm" / "requeued.h5.parts"
    process = subprocess.Popen(
        [PYTHON, "-m", "hpctrain.predict", str(trained.run_dir), *map(str, common), "--output", str(output),
         "--slurm", "launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
         "launcher.timeout_min=10"], cwd=trained.project, env=user_env(trained.installed, trained.project),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        job_id = next(line.split()[4].rstrip(";") for line in process.stdout
                      if line.startswith("submitted SLURM prediction job"))
        # Rank 0 (whose log the assertion below reads) computes the first half of the 750 chunks, rank 1 the
        # rest: wait for chunks of rank 0's own (rank 1 may be the first to write a few).
        rank0 = {f"chunk_{chunk:06d}.json" for chunk in range(375)}
        wait_until(lambda: len({path.name for path in parts.glob("chunk_*.json")} & rank0) >= 2, timeout=300,
                   what="2 of rank 0's chunks", interval=0.02)
        sh("scontrol", "requeue", job_id)
        release_when_requeued(job_id)
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
    # Requeued once (accounting lags the queue by a moment).
    wait_until(lambda: allocations(job_id) == ["REQUEUED", "COMPLETED"], timeout=60,
               what=f"job {job_id}'s accounting: {allocations(job_id)}")
    logs = "".join(path.read_text(errors="replace")
                   for path in sorted((output.parent / "submitit" / job_id).glob("*_log.*")))
    kept = [int(count) for count in re.findall(r"chunks to compute \((\d+) kept", logs)]
    assert kept and kept[-1] >= 1, logs[-3000:]  # the requeued attempt kept what the first one wrote
    assert_same_content(tmp_path / "local.h5", output)


EXPORTED = """
import sys, torch
path, kind = sys.argv[1], sys.argv[2]
model = torch.export.load(path).module() if kind == "torch.export" else torch.jit.load(path)
positions, lengths, descriptors = torch.randn(5, 7, 3), torch.tensor([7, 3, 2, 5, 1]), torch.randn(5, 4)
print(model(positions, lengths, descriptors).shape[0])
try:
    import molecules
except ImportError:
    print("without the user's package")
"""


@shares_the_install
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch.export", "torchscript"])
def test_export_loads_without_the_users_package_for_any_batch(trained: Trained, tmp_path: Path, kind: str) -> None:
    artefact = tmp_path / f"model.{kind}"
    result = user_tool(trained, "export", trained.run_dir, "--format", kind, "--output", artefact)
    assert "reloaded outputs match on a batch of 8" in result.stderr
    assert "Unable to load package" not in result.stderr, result.stderr  # no misleading warning
    config = json.loads((tmp_path / f"model.{kind}.config.json").read_text())
    assert config["model"]["_target_"] == "molecules.EnergyNet"
    shown = subprocess.run([PYTHON, "-c", EXPORTED, str(artefact), kind], cwd=tmp_path, capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(trained.installed)}).stdout
    assert shown.split() == ["5", "without", "the", "user's", "package"]


# -- fine-tuning ------------------------------------------------------------------------------------------------
@shares_the_install
@pytest.mark.slow
def test_fine_tuning_takes_the_backbone_freezes_it_and_trains_a_new_head(trained: Trained, tmp_path: Path) -> None:
    run_dir = tmp_path / "fine_tuned"
    result = user_launch(trained.installed, trained.project, *SHORT, "trainer.max_steps=8",
                         f"trainer.init_from={{run: {trained.run_dir}, exclude: [descriptors.*]}}",
                         "optim.freeze={strategy: explicit, phases: [{start: 0, freeze: [atom.*]}]}",
                         "optim.param_groups=[{name: head, params: [descriptors.*], lr: 0.01}]", run_dir=run_dir)
    assert "trainer.init_from: 4 weights taken from" in result.stderr + result.stdout
    source, tuned = final_weights(trained.run_dir), final_weights(run_dir)
    for name in ("atom.0.weight", "atom.0.bias", "atom.2.weight", "atom.2.bias"):
        assert torch.equal(tuned[name], source[name]), name  # taken, then frozen
    assert not torch.equal(tuned["descriptors.weight"], source["descriptors.weight"])  # a head of its own


@shares_the_install
@pytest.mark.slow
def test_fine_tuning_refuses_weights_that_do_not_fit_with_the_keys_named(trained: Trained, tmp_path: Path) -> None:
    run_dir = tmp_path / "refused"
    result = user_launch(trained.installed, trained.project, *SHORT, "model.hidden=8",
                         f"trainer.init_from={{run: {trained.run_dir}}}", run_dir=run_dir, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "atom.0.weight (16, 3) -> (8, 3)" in errors[0] and "atom.2.weight (1, 16) -> (1, 8)" in errors[0]
    assert "trainer.init_from.exclude" in errors[0] and not run_dir.exists()
    result = user_launch(trained.installed, trained.project, *SHORT, f"trainer.init_from.run={trained.run_dir}",
                         "trainer.init_from.include=[head.*]", run_dir=run_dir, check=False)
    assert result.returncode == 2 and "trainer.init_from.include: head.* match no weight" in result.stderr


@shares_the_install
@pytest.mark.slow
def test_init_from_strict_and_partial_selection(trained: Trained) -> None:
    from torch import nn

    from hpctrain.config import InitFromConfig
    from hpctrain.run.fine_tune import initial_weights, initialise_from

    class WithNewHead(nn.Module):  # the trained backbone's names, another head
        def __init__(self) -> None:
            super().__init__()
            self.atom = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
            self.head = nn.Linear(4, 2)

    model, source = WithNewHead(), final_weights(trained.run_dir)
    head = model.head.weight.detach().clone()
    initialise_from(model, InitFromConfig(run=str(trained.run_dir), include=["atom.*"]))
    assert torch.equal(model.atom[0].weight, source["atom.0.weight"]) and torch.equal(model.head.weight, head)
    assert sorted(initial_weights(model, InitFromConfig(run=str(trained.run_dir)))) == [
        "atom.0.bias", "atom.0.weight", "atom.2.bias", "atom.2.weight"]  # descriptors.*: not in this model
    with pytest.raises(ConfigError, match=r"strict=true: not in this model: descriptors.bias, descriptors.weight; "
                                          r"not initialised: head.bias, head.weight"):
        initial_weights(model, InitFromConfig(run=str(trained.run_dir), strict=True))
    with pytest.raises(ConfigError, match="trainer.init_from.exclude: atom.9.* match no weight"):
        initial_weights(model, InitFromConfig(run=str(trained.run_dir), exclude=["atom.9.*"]))
    with pytest.raises(ConfigError, match="trainer.init_from: .* has no checkpoint of step 5"):
        initial_weights(model, InitFromConfig(run=str(trained.run_dir), checkpoint="5"))


@shares_the_install
@pytest.mark.slow
def test_a_fine_tuning_run_killed_and_restarted_is_bit_exact(trained: Trained, tmp_path: Path) -> None:
    run = [*SHORT, "trainer.max_steps=40", f"trainer.init_from={{run: {trained.run_dir}, exclude: [descriptors.*]}}"]
    user_launch(trained.installed, trained.project, *run, run_dir=tmp_path / "reference")
    kill_after_checkpoint(["--config-dir", "conf", "task=molecules", *run], tmp_path / "resumed", 13,
                          cwd=trained.project, env=user_env(trained.installed, trained.project))
    restarted = user_launch(trained.installed, trained.project, *run, run_dir=tmp_path / "resumed")
    log = restarted.stdout + restarted.stderr
    assert "resumed from" in log and "weights taken from" not in log  # its own checkpoint, not init_from
    reference = user_inspect(trained.installed, trained.project, tmp_path / "reference")
    resumed = user_inspect(trained.installed, trained.project, tmp_path / "resumed")
    assert reference["newest_checkpoint"]["model_sha256"] == resumed["newest_checkpoint"]["model_sha256"]


# -- the CBED task's export -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch.export", "torchscript"])
def test_cbed_model_export_round_trip(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, kind: str) -> None:
    from hpctrain.use.export import export_run

    run_dir = tmp_path_factory.getbasetemp() / "cbed_export_run"
    if not (run_dir / "result.json").exists():  # one tiny run for both formats
        launch(tiny_overrides(tiny_data, "trainer.max_steps=2", "trainer.val_every_steps=2",
                              "callbacks.checkpoint.every_steps=2"), run_dir=run_dir)
    artefact = export_run(run_dir, form=kind)
    reloaded = torch.export.load(str(artefact)).module() if kind == "torch.export" else torch.jit.load(str(artefact))
    with h5py.File(tiny_data, "r") as file:
        images = torch.from_numpy(file["images"][:3]).float()
    from hpctrain.use.runs import load_model

    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), load_model(run_dir)(images))
