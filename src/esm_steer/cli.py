"""Thin Hydra mains, one per stage: compose the config, check it, open the run dir, call
the stage function (:mod:`esm_steer.pipelines`: every stage is ``run(cfg, run, engine=None)``).

A bad config value or a missing artifact ends the job with one line (exit code 2). In a
multirun a failing job writes ``error.txt`` into its dir and the sweep goes on, so that the
suite callback can list it; the multirun then exits 1 after writing the suite tables.
"""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from esm_steer import tracking
from esm_steer.config import ConfigError, ESMConfig, register_configs, validate
from esm_steer.data.tasks import DataError
from esm_steer.engine.registry import engine_class
from esm_steer.evaluate.ranking import run_objective
from esm_steer.launch import prepare_job  # registers esm_n_jobs; claims a GPU per worker
from esm_steer.pipelines import run_stage as run_pipeline_stage
from esm_steer.pipelines import stage_function
from esm_steer.runs import LATEST, RunError, current_output_dir, read_latest, start_run  # registers resolvers

log = logging.getLogger("esm_steer")

register_configs()

# what a user can get wrong (one line, exit 2); anything else is a bug and keeps its traceback
EXPECTED_ERRORS = (ConfigError, RunError, DataError, FileNotFoundError)


def _check_latest_dir() -> None:
    """outputs.run_id=latest without a LATEST pointer leaves Hydra's run dir at '.../latest'
    (the resolver cannot raise cleanly there): remove that empty dir and say why in one line."""
    out = current_output_dir()
    if out.name != "latest" or (out.parent / LATEST).exists():
        return
    if all(p.name in (".hydra", "logs") for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
    read_latest(out.parent.parent, out.parent.name)  # raises RunError with the message


def run_stage(entry: str, cfg: DictConfig) -> float | None:
    """Run one stage; returns esm-eval's objective (eval.objective of the esm row, for a sweeper
    such as hparams_search=esm_optuna), else None."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    stage = entry if entry != "token2048" else f"token2048_{cfg.stage.name}"
    tracked = tracking.NOT_TRACKED
    try:
        prepare_job(cfg)  # multirun: this worker's GPU (or one CPU thread), before any torch/CUDA
        _check_latest_dir()
        tracked = tracking.start_stage(cfg, stage)  # logger=mlflow; never raises
        validate(cfg)
        engine_class(str(cfg.model.backend))  # a backend no engine registered: one line, before the run dir
        stage_function(entry, cfg.stage.name)  # an unknown stage: one line, before the run dir opens
        run = start_run(cfg, stage=stage)
        run_pipeline_stage(entry, cfg, run)
        objective = run_objective(run.dir, cfg) if entry == "eval" else None
        tracked.finish(run.dir, objective=objective)
        return objective
    except Exception as e:  # noqa: BLE001 - one line for the user, the rest in the log
        expected = isinstance(e, EXPECTED_ERRORS)
        msg = f"esm-{entry}: {e}" if expected else f"esm-{entry}: {type(e).__name__}: {e}"
        tracked.finish(current_output_dir(), error=msg)
        if multirun:
            out = current_output_dir()
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(msg + "\n\n" + traceback.format_exc())
            log.error("job failed (sweep goes on): %s", msg)
            return None
        if expected:
            log.debug("%s", traceback.format_exc())
            print(msg, file=sys.stderr)
            sys.exit(2)
        raise


_GROUPS = {"model", "task", "prompt", "online", "mode", "stage", "experiment", "logger", "hparams_search"}
CONF_DIR = Path(__file__).parent / "conf"


def precheck_overrides(args: list[str]) -> str | None:
    """One-line message for the first command-line override that the schema rejects
    (unknown key, wrong type), or None. Hydra's own message for these spans several lines."""
    plain = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception:  # noqa: BLE001 - malformed: Hydra reports it
        return None
    schema = OmegaConf.structured(ESMConfig)
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key.startswith("hydra") or o.package:
            continue
        if "." not in key and key in _GROUPS:  # a group choice: an option that exists (Hydra skips an
            # unknown one of an optional group, and says so in several lines for the others)
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            for v in values:
                if v not in options and v != "null":
                    return f"unknown {key} '{v}' (options: {', '.join(options)})"
            continue
        if key.split(".")[0] not in schema:
            return f"unknown config key '{key}' (top-level keys: {', '.join(schema.keys())})"
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            try:
                OmegaConf.merge(schema, OmegaConf.from_dotlist([f"{key}={v}"]))
            except Exception as e:  # noqa: BLE001
                first = str(e).strip().splitlines()[0]
                return f"bad override '{key}={v}': {first}"
    return None


_ID_KEYS = ("outputs.run_id", "outputs.suite_id")


def quote_ids(args: list[str]) -> list[str]:
    """Keep run ids strings: Hydra would read `outputs.run_id=20261122_001700` as the integer
    20261122001700 (underscores are digit separators) and open a new run dir."""
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") in _ID_KEYS and value and value[0] not in "'\"" and "," not in value:
            a = f"{key}='{value}'"
        out.append(a)
    return out


def _main(entry: str):
    sys.argv[1:] = quote_ids(sys.argv[1:])
    problem = precheck_overrides(sys.argv[1:])
    if problem:
        print(f"esm-{entry}: {problem}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path="conf", config_name=entry)
    def main(cfg: DictConfig) -> float | None:
        return run_stage(entry, cfg)  # the objective, for a sweeper

    return main


def mine() -> None:
    _main("mine")()


def select() -> None:
    _main("select")()


def memory() -> None:
    _main("memory")()


def eval_() -> None:
    _main("eval")()


def case() -> None:
    _main("case")()


def token2048() -> None:
    _main("token2048")()
