"""trainer.compile on CPU (inductor, the system C compiler), through the real launcher: a compiled run reaches the
eager run's weights to float tolerance, stopping and resuming a compiled run is bit-exact, its checkpoints hold
the plain state dict (resumed uncompiled), the epoch's shorter last batch and validation batches of another size
trigger no recompilation, and a freeze phase change recompiles and trains as eagerly.

A tiny model keeps inductor's work small: its first compilation on a cold cache costs about a minute per graph on
a busy 2-core machine, a few seconds once inductor's on-disk cache holds it (the runs here share their graphs)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from hpctrain.config import ConfigError

from .conftest import final_weights, launch, tiny_overrides
from .test_config import compose_config
from .test_freeze import weights_at


class SmallNet(nn.Module):
    """A conv stem and a linear head (about 150 parameters) for the CBED task's 8 outputs; ignores the demo
    model's other config keys."""

    def __init__(self, width: int = 8, **_: object) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, kernel_size=3, stride=2)
        self.head = nn.Linear(width, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(images.unsqueeze(1))).mean(dim=(2, 3)))


COMPILE = "trainer.compile=true"
# 154 training samples in batches of 32: 5 steps per epoch, the last of 26 samples (inductor's CPU code splits
# batch sizes at 16, so a shorter last batch would get a graph of its own; on a GPU it would not). 38 validation
# samples in 2 batches of 19: the evaluation graph is compiled at another batch size than training's.
RUN = ["model._target_=tests.test_compile.SmallNet", "trainer.micro_batch_size=32", "data.val_batch_size=19",
       "trainer.max_steps=10", "trainer.val_every_steps=5", "callbacks.checkpoint.every_steps=5",
       "callbacks.early_stopping.enabled=false", "optim.schedule.name=constant",
       "callbacks.metrics.flush_every_seconds=0"]


# The two tests that launch set TORCH_LOGS, which torch reads at import: their commands get a zygote of their own
# (tests/zygote.py). One xdist group, so that one worker starts that zygote, not both.
shares_the_zygote = pytest.mark.xdist_group("compile_zygote")


def recompile_reasons(stderr: str) -> list[str]:
    """The guard failures dynamo logged as the reasons of its recompilations (TORCH_LOGS=recompiles)."""
    return re.findall(r"\[__recompiles\]\s+- (.*)", stderr)


def assert_close(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@shares_the_zygote
def test_compiled_run_equals_eager_resumes_bit_exact_and_uncompiled(tmp_path: Path, tiny_data: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    args = tiny_overrides(tiny_data, *RUN)
    launch(args, run_dir=tmp_path / "eager")
    compiled = launch([*args, COMPILE], run_dir=tmp_path / "compiled")
    # Training is one graph, evaluation (eval mode, no gradients) the other: no batch size caused a recompile.
    reasons = recompile_reasons(compiled.stderr)
    assert reasons and all("GLOBAL_STATE" in reason or "training" in reason for reason in reasons), reasons
    launch([*args, COMPILE, "trainer.max_steps=5"], run_dir=tmp_path / "resumed")  # stopped at step 5
    shutil.copytree(tmp_path / "resumed", tmp_path / "uncompiled")
    assert "resumed from" in launch([*args, COMPILE], run_dir=tmp_path / "resumed").stdout
    assert "resumed from" in launch(args, run_dir=tmp_path / "uncompiled").stdout  # a compiled run's checkpoint

    eager = final_weights(tmp_path / "eager")
    weights = final_weights(tmp_path / "compiled")
    assert not any("_orig_mod" in name or name.startswith("compiled.") for name in weights)
    SmallNet().load_state_dict(weights)  # strict: the plain module's state dict
    assert_close(weights, eager)
    resumed = final_weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], weights[name]) for name in weights)
    assert_close(final_weights(tmp_path / "uncompiled"), eager)


@pytest.mark.slow
@shares_the_zygote
def test_freeze_phase_change_with_compile(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    # Steps 0-2: the stem is frozen; from step 3 nothing is (the graphs of the test above: cached by inductor).
    freeze = "optim.freeze={strategy: explicit, phases: [{start: 0, freeze: ['stem.*']}, {start: 3, freeze: []}]}"
    args = tiny_overrides(tiny_data, *RUN, freeze, "trainer.max_steps=6", "trainer.val_every_steps=6",
                          "callbacks.checkpoint.every_steps=3")
    launch(args, run_dir=tmp_path / "eager")
    compiled = launch([*args, COMPILE], run_dir=tmp_path / "compiled")
    assert any("requires_grad" in reason for reason in recompile_reasons(compiled.stderr)), compiled.stderr[-3000:]
    from hpctrain.components import build_components

    initial = build_components(compose_config(*args)).model.state_dict()
    at_3 = weights_at(tmp_path / "compiled", 3)
    assert all(torch.equal(initial[name], at_3[name]) for name in ("stem.weight", "stem.bias"))
    assert not torch.equal(initial["head.weight"], at_3["head.weight"])
    final = final_weights(tmp_path / "compiled")
    assert not torch.equal(at_3["stem.weight"], final["stem.weight"])
    assert_close(final, final_weights(tmp_path / "eager"))


@pytest.mark.parametrize("value,message", [
    ("yes", "trainer.compile must be true, false or a dict of torch.compile options"),
    ("{mdoe: max-autotune}", "trainer.compile.mdoe: not a torch.compile option"),
    ("{mode: fastest}", "trainer.compile.mode must be one of"),
    ("{dynamic: sometimes}", "trainer.compile.dynamic must be a bool"),
    ("{mode: max-autotune, options: {}}", "`mode` or `options`, not both"),
])
def test_bad_compile_settings_are_refused_with_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(f"trainer.compile={value}")
    assert compose_config("trainer.compile={mode: max-autotune, dynamic: false}").trainer.compile == {
        "mode": "max-autotune", "dynamic": False}


def test_the_watchdog_does_not_time_a_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpctrain.process import watchdog
    from hpctrain.run.compile import compile_model

    dog = watchdog.Watchdog(limit_s=1.0, rank=0)  # its thread not started: only its pause state is looked at
    monkeypatch.setattr(watchdog, "_active", dog)
    model = compile_model(nn.Linear(2, 2), {"backend": "eager"})  # dynamo's callbacks run for any backend
    seen: list[str | None] = []
    handler = torch._dynamo.callback_handler
    handler.register_start_callback(record := lambda _: seen.append(dog._paused))  # runs after hpctrain's
    try:
        with watchdog.paused("evaluation"):
            model(torch.zeros(3, 2))
            assert dog._paused == "evaluation"  # the evaluation's pause goes on after the compilation
        assert dog._paused is None
    finally:
        handler.remove_start_callback(record)
    assert seen == ["compilation"]
