"""`python -m hpctrain.launch`: the Hydra app over the configs shipped in conf/ (add your own with
`--config-dir DIR`). With no arguments it trains the built-in task in debug mode (one local process);
`launcher.num_processes=N` runs N local DDP ranks; `launcher=slurm` submits the run to SLURM with submitit and
returns at once (`-m` sweeps become one job array, see hydra_plugins/hpctrain_launcher).

Bad input is refused by `Preflight`, a Hydra callback that runs after composition and before Hydra creates the
run directory: the typed config, the run directory, every `_target_`, the datasets, the model, the loss and one
dry step are all checked first, and the one error found is printed without a traceback. Hydra's own errors
while composing (a wrong type, an unknown key, an override it cannot parse) are printed the same way (`run`).

Under `launcher=srun` (slurm/train.sbatch) each task is a rank of a SLURM job: `run` installs its stop protocol
(hpctrain.process.stop) inside a job step before the config is composed, and the srun path hands it to
`run_srun_task`; for any other launcher it is released as soon as the config says so (`_settle_stop`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import hpctrain.conf
from hpctrain.components import check_run_inputs
from hpctrain.config import Config, ConfigError, register_configs, to_config
from hpctrain.instantiate import first_line
from hpctrain.process.exit import skip_final_collection
from hpctrain.process.stop import StopProtocol, in_job_step
from hpctrain.launching.job import (CheckProcessFailed, check_in_rank_process, check_run, check_run_dir_writable,
                                    remove_launcher_leftovers, run_local)
from hpctrain.launching.slurm import check_resources, follow_instructions, run_srun_task, submit_run

log = logging.getLogger("hpctrain")

# The configs (conf/ in the repository) ship as the package hpctrain.conf, so an installed hpctrain, editable or
# not, composes them from any directory.
CONFIG_DIR = str(Path(hpctrain.conf.__file__).resolve().parent)
# The typed config Preflight checked in this process, which the task function of the same (single) run takes
# instead of converting and checking it a second time.
_checked_by_preflight: Config | None = None
# Inside a SLURM job step, the stop protocol `run` installed before composing the config: an srun task's must take
# a USR2 or SIGTERM that comes while Hydra composes and Preflight checks (the default action would end the task
# instead of requeueing it). Which launcher this is, only the composed config tells: `_settle_stop`.
_job_step_stop: StopProtocol | None = None


def fail(message: str, *, exit_code: int = 2) -> None:
    print(f"hpctrain: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def _settle_stop(launcher: str) -> StopProtocol | None:
    """The early stop protocol if this process is an srun task (launcher=srun); for any other launcher USR2 and
    SIGTERM go back to their default action (one that came meanwhile ends the process now, as it would have)."""
    global _job_step_stop
    if _job_step_stop is not None and launcher != "srun":
        _job_step_stop.release()
        _job_step_stop = None
    return _job_step_stop


def checked_config(cfg: DictConfig) -> Config:
    return to_config(cfg)


def check_inputs(config: Config, run_dir: Path) -> None:
    """All checks of a run's inputs, those of a run on local ranks in a process forked like them; srun tasks all
    start at once: they must find the data, not race to make it (and each rank checks the checkpoint it resumes
    from itself, hpctrain.train)."""
    if config.launcher.name == "srun":
        check_run_inputs(config, prepare=False)
        return
    if config.launcher.name == "local" and config.launcher.num_processes > 1:
        check_in_rank_process(config, run_dir)  # where torch is imported already (hpctrain.launching.early)
    else:
        check_run(config, run_dir)
    if config.launcher.name == "slurm":
        check_resources(config.launcher)


def compose_config(overrides: list[str], *, config_dir: str | None = None) -> Config:
    """The typed config the launcher would run with these overrides (composed, not run); `config_dir` adds a
    user's config directory, like `--config-dir`."""
    register_configs()
    if config_dir is not None:
        overrides = [*overrides, f"hydra.searchpath=[file://{Path(config_dir).absolute()}]"]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as error:
        raise ConfigError(hydra_error_message(error)) from None
    return checked_config(cfg)


def hydra_error_message(error: HydraException) -> str:
    """Hydra's composition error (a wrong type, an unknown key, a missing config option, an override it cannot
    parse) as one line that starts with the key at fault, like hpctrain's own errors."""
    # OmegaConf's error: the cause of an override's, the context of a YAML file's (Hydra raises it from there).
    cause = error.__cause__ or error.__context__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        message = f"{key}: {str(cause).splitlines()[0]}"
        where = re.match(r"In '([^']+)'", str(error))  # the config file that holds the key
        if where and where.group(1) != "config":
            message += f" (in {where.group(1)})"
        schema = getattr(cause, "object_type", None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(schema):
            parent, _, name = key.rpartition(".")
            close = difflib.get_close_matches(name, [field.name for field in dataclasses.fields(schema)], n=1)
            if close:
                message += f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
        elif isinstance(cause, ConfigAttributeError):  # a free-form node (a `_target_`'s arguments): + adds a key
            message += f"; to add the key, use +{key}=..."
        return message
    # Hydra's own text: "In 'config': Could not find 'task/nosuch'", "Available options in 'task':", one option
    # a line, then the config search path (left out).
    lines = [line.strip() for line in str(error).split("Config search path:")[0].splitlines() if line.strip()]
    parts: list[str] = []
    for line in lines:
        if parts and parts[-1].endswith(":"):
            parts[-1] += f" {line}"
        elif parts and "options in" in parts[-1]:
            parts[-1] += f", {line}"
        else:
            parts.append(line)
    message = "; ".join(parts) or type(error).__name__
    override = getattr(error, "override", None)  # an override Hydra cannot parse
    return f"{override}: {message}" if override else message


class Preflight(Callback):
    """Validates a single run completely before anything is written (sweep points are checked per job)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _checked_by_preflight
        _settle_stop(str(OmegaConf.select(config, "launcher.name", default="")))  # before the slow checks
        HydraConfig.instance().set_config(config)  # lets `${hydra:...}` interpolations resolve this early
        try:
            typed = checked_config(config)
            run_dir = Path(config.hydra.run.dir).absolute()
            check_run_dir_writable(run_dir)
            check_inputs(typed, run_dir)
        except ConfigError as error:
            fail(str(error))
        except (Exception, SystemExit) as error:  # a bug, or a user's sys.exit: Hydra would only warn of a
            traceback.print_exc()  # callback's exception and go on to run
            cause = (str(error).splitlines()[0] if isinstance(error, CheckProcessFailed)
                     else f"{type(error).__name__}: {first_line(error)}")
            fail(f"the preflight failed: {cause}", exit_code=1)
        _checked_by_preflight = typed

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _settle_stop(str(OmegaConf.select(config, "launcher.name", default="")))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    global _checked_by_preflight
    run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
    try:
        # A single run's task function gets the config its Preflight saw (Hydra deep-copies it without `hydra`);
        # a multirun point's was not seen by Preflight.
        checked, _checked_by_preflight = _checked_by_preflight, None
        config = checked if checked is not None and HydraConfig.get().mode == RunMode.RUN else checked_config(cfg)
        stop = _settle_stop(config.launcher.name)
        if config is not checked:
            check_inputs(config, run_dir)
        if config.launcher.name == "slurm":
            return submit(config, run_dir)
        if config.launcher.name == "srun":
            return run_srun_task(config, run_dir, stop=stop)
        log.info("run directory: %s", run_dir)
        summary = run_local(config, run_dir)
        if summary.get("failed"):  # stopped by bad numbers, bad data or a failed write: the reason, one line
            fail(summary["stop_reason"], exit_code=1)
        if summary.get("finished"):
            print(how_to_use(run_dir), flush=True)
        return summary
    except ConfigError as error:
        remove_launcher_leftovers(run_dir)
        fail(str(error))
        raise  # unreachable: fail() exits


def submit(config: Config, run_dir: Path) -> dict[str, Any]:
    job = submit_run(config, run_dir)
    print(follow_instructions(job.job_id, run_dir), flush=True)
    if not config.launcher.wait:
        return {"job_id": job.job_id, "run_dir": str(run_dir)}
    summary = job.results()[0]  # rank 0's summary; raises with the job's error if it failed
    print(f"job {job.job_id} done: {summary}", flush=True)
    return summary


def how_to_use(run_dir: Path) -> str:
    """What a finished run's user can do next (printed at the end of a local run)."""
    return (f"trained: {run_dir}\n"
            f"  in Python:  model = hpctrain.load_model({str(run_dir)!r})   # best checkpoint, eval mode\n"
            f"  predict:    python -m hpctrain.predict {run_dir} --input FILE.h5   # -> {run_dir}/predictions/\n"
            f"  export:     python -m hpctrain.export {run_dir} --format torch.export")


def run() -> None:
    """The command line (`python -m hpctrain.launch`, the `hpctrain` script): the Hydra app, with Hydra's
    composition errors reported like every other bad input: one line `hpctrain: error: <key>: ...`, exit code 2
    (Hydra prints them on several lines and exits with 1). --help, --cfg, --info, -m and HYDRA_FULL_ERROR=1 keep
    Hydra's own behaviour."""
    global _job_step_stop
    if in_job_step() and _job_step_stop is None:  # first: see _job_step_stop
        _job_step_stop = StopProtocol()
        _job_step_stop.install()
    # Hydra reports every error of its app through run_and_report (private, so used only if it is there):
    # composition errors are caught inside it, before Hydra formats them; everything else goes on to Hydra.
    from hydra._internal import utils as hydra_internal

    skip_final_collection()
    register_configs()
    report = getattr(hydra_internal, "run_and_report", None)
    if report is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return

    def run_and_report(function: Callable[[], Any]) -> Any:
        def composition_errors_in_one_line() -> Any:
            try:
                return function()
            except (ConfigCompositionException, OverrideParseException) as error:
                fail(hydra_error_message(error))

        return report(composition_errors_in_one_line)

    hydra_internal.run_and_report = run_and_report
    try:
        main()
    finally:
        hydra_internal.run_and_report = report


