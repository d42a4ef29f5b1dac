"""Stage ``eval``: greedy, ESM (as ``online.variant``), its ablations and the static baseline
at one budget T_max = decode.max_new_tokens.

Per method, ``eval/<tag>/per_example.jsonl`` is appended one engine-batch chunk at a time,
so a killed run resumes where it stopped. Then, from the records on disk:
``tables/main_results_single.csv``, ``tables/ablation.csv``, ``tables/diagnostics_T<T>.csv|json``,
``figures/tokens_hist_T<T>.pdf|png``, ``figures/acc_vs_budget_T<T>.pdf|png``,
``figures/steering_diagnostics_T<T>.png`` and ``cases/cases_T<T>.md``.

With ``eval.artifact_run_dir`` set, greedy records are generated once into the artifact dir
(``eval/greedy_<split>_T<T>_<hash>/``, under a file lock) and shared by every job of a sweep.
``eval.best_of=<suite dir>`` runs that suite's best configuration once on the test split.

The offline artifacts (library/, memory/) are read in place from the run dir or from
``eval.artifact_run_dir`` (never copied); which one was used is logged and recorded.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from esm_steer.engine import require_steering
from esm_steer.esm import artifacts
from esm_steer.evaluate import records as R
from esm_steer.evaluate import report
from esm_steer.evaluate.case_markdown import write_cases
from esm_steer.evaluate.diagnostics import write_diagnostics
from esm_steer.evaluate.figures import accuracy_vs_budget, steering_diagnostics_figure, tokens_histogram
from esm_steer.evaluate.stats import TRUNCATION_WARN_RATE, summarize
from esm_steer.io import JsonlAppender, atomic_write_json
from esm_steer.runs import Run, RunError, resolve_run_path
from esm_steer.splits import check_no_overlap

log = logging.getLogger(__name__)

ARTIFACT_DIRS = (artifacts.LIBRARY_DIR, artifacts.MEMORY_DIR)
OFFLINE_STAGES = ("mine", "select", "memory")


# ---------------------------------------------------------------- artifacts


def has_artifacts(run_dir: Path) -> bool:
    return all((run_dir / d).is_dir() and any((run_dir / d).iterdir()) for d in ARTIFACT_DIRS)


def _candidate_paths(path: str, root_dir: str) -> list[Path]:
    """``outputs/<name>/latest`` as given (relative to the cwd), and under outputs.root_dir
    when root_dir is elsewhere (its first component then stands for the root)."""
    p = Path(path)
    cands = [p]
    if not p.is_absolute() and len(p.parts) > 1:
        cands.append(Path(root_dir) / Path(*p.parts[1:]))
    return cands


def resolve_artifact_dir(cfg: DictConfig, run: Run, run_offline: Callable[[], None] | None = None) -> Path:
    """The dir holding library/ and memory/: eval.artifact_run_dir, else this run dir; with
    neither, run the offline stages here when eval.run_offline_if_missing, else RunError."""
    given = cfg.eval.artifact_run_dir
    if given:
        err: Exception | None = None
        for cand in _candidate_paths(str(given), str(cfg.outputs.root_dir)):
            try:
                d = resolve_run_path(cand)
            except RunError as e:
                err = err or e
                continue
            if has_artifacts(d):
                return d
            err = RunError(
                f"eval.artifact_run_dir={given} ({d}) has no {' and '.join(ARTIFACT_DIRS)}/; "
                f"make them with esm-mine, esm-select, esm-memory into that run"
            )
            break
        raise RunError(str(err) if err else f"eval.artifact_run_dir={given} does not resolve")
    if has_artifacts(run.dir):
        return run.dir
    if cfg.eval.run_offline_if_missing:
        missing = [f"{d}/" for d in ARTIFACT_DIRS if not ((run.dir / d).is_dir() and any((run.dir / d).iterdir()))]
        online = [m for m in eval_methods(cfg) if m in R.ONLINE_METHODS]
        log.info(
            "eval.run_offline_if_missing=true and %s lacks %s (needed by %s): running the offline stages %s "
            "into this run dir first",
            run.dir,
            " and ".join(missing),
            ", ".join(online),
            " -> ".join(OFFLINE_STAGES),
        )
        (run_offline or (lambda: run_offline_stages(cfg, run)))()
        if not has_artifacts(run.dir):
            raise RunError(f"the offline stages ran but {run.dir} still lacks library/ or memory/")
        return run.dir
    raise RunError(
        f"no library/ and memory/ in {run.dir}: run `esm-mine ... && esm-select ... outputs.run_id=latest && "
        f"esm-memory ... outputs.run_id=latest` first, or set eval.artifact_run_dir=outputs/<run_name>/latest "
        f"or eval.run_offline_if_missing=true (greedy alone needs none: 'eval.methods=[greedy]' 'eval.ablations=[]')"
    )


def run_offline_stages(cfg: DictConfig, run: Run) -> None:
    import importlib

    for stage in OFFLINE_STAGES:
        t0 = time.perf_counter()
        importlib.import_module(f"esm_steer.esm.{stage}").run(cfg, run)
        log.info("offline stage %s done in %.1fs", stage, time.perf_counter() - t0)


# ---------------------------------------------------------------- generation


def method_label(cfg: DictConfig, method: str) -> str:
    """The row a method runs as: ``esm`` runs (and is labelled) ``online.variant``; the others are themselves."""
    return str(cfg.online.variant) if method == "esm" else method


def online_cfg_for(cfg: DictConfig, variant: str) -> DictConfig:
    """A copy of cfg.online with ``variant`` (a method label: esm, an ablation, static) set."""
    oc = copy.deepcopy(cfg.online)
    with open_dict(oc):
        oc.variant = variant
    return oc


def make_policy(engine, artifact_dir: Path, cfg: DictConfig, variant: str, cache: dict):
    """OnlinePolicy for one variant; library and memory are loaded once per run (``cache``)."""
    from esm_steer.esm.library import Library
    from esm_steer.esm.memory import Memory
    from esm_steer.esm.online import OnlinePolicy

    if "library" not in cache:
        cache["library"] = Library.load(artifact_dir)
        cache["memory"] = Memory.load(artifact_dir, engine.info.model_id, engine.info.steer_layer)
    return OnlinePolicy(engine, cache["library"], cache["memory"], online_cfg_for(cfg, variant), cfg.control_points)


def greedy_generate(engine, prompts: Sequence[list[int]], t_max: int):
    from esm_steer.engine.base import SamplingSpec

    return [s[0] for s in engine.generate(list(prompts), SamplingSpec(max_new_tokens=t_max, temperature=0.0))]


def make_generator(method: str, engine, cfg: DictConfig, artifact_dir: Path | None, cache: dict):
    """(prompts) -> list of results, and the result -> record converter, for one method."""
    t_max = int(cfg.decode.max_new_tokens)
    if method == "greedy":
        return (lambda prompts: greedy_generate(engine, prompts, t_max)), R.record_from_sample
    if method not in R.ONLINE_METHODS:
        raise ValueError(f"unknown eval method {method!r}")
    policy = make_policy(engine, artifact_dir, cfg, method, cache)
    return (lambda prompts: policy.run(list(prompts), max_new_tokens=t_max)), R.record_from_online


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate_records(
    examples: Sequence,
    prompts: Sequence[list[int]],
    generate: Callable[[list[list[int]]], list],
    to_record: Callable,
    appender: JsonlAppender,
    task: str,
    batch_size: int,
    method: str | None = None,
    key: Callable[[object], object] | None = None,
    desc: str = "",
) -> float:
    """Generate the examples the appender lacks, a chunk at a time, appending after each chunk.

    A chunk that raises is retried one example at a time; an example that still raises is
    recorded as an error (wrong) and the run goes on. Returns the generation wall seconds.
    """
    from tqdm.auto import tqdm

    key = key or (lambda ex: str(ex.id))
    todo = [(ex, p) for ex, p in zip(examples, prompts) if key(ex) not in appender.done_keys]
    if len(todo) < len(examples):
        log.info(
            "%s: %d of %d examples already in %s; resuming",
            desc,
            len(examples) - len(todo),
            len(examples),
            appender.path,
        )
    extra = {"method": method} if method else {}
    total = 0.0
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=desc, leave=False)
    for chunk in _chunks(todo, max(1, batch_size)):
        t0 = time.perf_counter()
        try:
            results = generate([p for _, p in chunk])
            if len(results) != len(chunk):
                raise RuntimeError(f"generator returned {len(results)} results for {len(chunk)} prompts")
            dt = time.perf_counter() - t0
            recs = [to_record(ex, res, task, wall_s=dt / len(chunk), **extra) for (ex, _), res in zip(chunk, results)]
        except Exception as e:  # noqa: BLE001 - isolate the failing example, keep going
            log.warning(
                "%s: a chunk of %d failed (%s: %s); retrying one at a time", desc, len(chunk), type(e).__name__, e
            )
            log.debug("%s", traceback.format_exc())
            recs = [_one(ex, p, generate, to_record, task, extra, desc) for ex, p in chunk]
            dt = time.perf_counter() - t0
        total += dt
        appender.extend(recs)
        bar.update(len(chunk))
    bar.close()
    return total


def _one(ex, prompt, generate, to_record, task, extra, desc) -> dict:
    t0 = time.perf_counter()
    try:
        res = generate([prompt])[0]
        return to_record(ex, res, task, wall_s=time.perf_counter() - t0, **extra)
    except Exception as e:  # noqa: BLE001
        log.warning("%s: example %s failed: %s: %s (recorded as wrong)", desc, ex.id, type(e).__name__, e)
        return R.error_record(ex, task, f"{type(e).__name__}: {e}", wall_s=time.perf_counter() - t0, **extra)


# ---------------------------------------------------------------- best of a tuning suite

# overrides of a suite job that are sweep plumbing or the split, never carried to the test run
_BEST_OF_DROP = ("hydra", "outputs.suite_id", "outputs.run_id", "launch", "eval.split", "eval.best_of")


def _override_key(item: str) -> str:
    return str(item).partition("=")[0].lstrip("+~")


def best_of_overrides(job_overrides: Sequence[str], current: Sequence[str]) -> list[str]:
    """The winning job's overrides, then this command's (a key given here replaces the job's),
    then ``eval.split=test``; sweep plumbing (hydra.*, launch.*, outputs ids) and the split dropped."""

    def keep(o: str) -> bool:
        k = _override_key(o)
        return "=" in str(o) and not any(k == d or k.startswith((d + ".", d + "/")) for d in _BEST_OF_DROP)

    merged: dict[str, str] = {}
    for o in [*job_overrides, *current]:
        if keep(o):
            merged.pop(_override_key(o), None)  # a later value replaces, in its own place
            merged[_override_key(o)] = str(o)
    return [*merged.values(), "eval.split=test"]


def _command_overrides() -> list[str]:
    """This command's overrides (Hydra's task overrides); [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def apply_best_of(cfg: DictConfig, run: Run) -> DictConfig:
    """eval.best_of=<suite dir>: the config of the suite's rank-1 job (tables/suite_ranking.csv,
    made from the job dirs when absent), with this command's overrides, on eval.split=test.
    Logs and writes ``best_of.json`` (which job, its validation numbers, the overrides)."""
    import pandas as pd
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from esm_steer.config import validate
    from esm_steer.evaluate.jobs import read_job
    from esm_steer.evaluate.ranking import SUITE_RANKING, rank_configurations

    given = str(cfg.eval.best_of)
    sweep = next((p for p in _candidate_paths(given, str(cfg.outputs.root_dir)) if p.is_dir()), None)
    if sweep is None:
        raise RunError(f"eval.best_of={given}: no such suite dir (give outputs/_suite/<suite_id>)")
    path = sweep / artifacts.TABLES_DIR / SUITE_RANKING
    ranking = pd.read_csv(path) if path.exists() else rank_configurations(sweep)
    if ranking is None or len(ranking) == 0:
        raise RunError(f"eval.best_of={given}: no finished job with an esm row in {sweep} (tables/{SUITE_RANKING})")
    best = ranking.iloc[0]
    if str(best["split"]) == "test":
        raise RunError(f"eval.best_of={given}: the suite was ranked on the test split; tune with eval.split=val")
    job = read_job(int(best["job_num"]), sweep / str(int(best["job_num"])))
    extra = []
    if "eval.artifact_run_dir" not in {_override_key(o) for o in job.override_list} and has_artifacts(job.dir):
        extra = [f"eval.artifact_run_dir={job.dir.resolve()}"]  # the job mined its own artifacts
    overrides = best_of_overrides([*job.override_list, *extra], _command_overrides())
    if GlobalHydra.instance().is_initialized():
        new = compose(config_name="eval", overrides=overrides)
    else:
        with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
            new = compose(config_name="eval", overrides=overrides)
    with open_dict(new):
        new.outputs = copy.deepcopy(cfg.outputs)  # this run's dir and ids
        new.eval.best_of = None
    validate(new)
    num = lambda k: None if pd.isna(best.get(k)) else float(best[k])  # noqa: E731
    info = {
        "suite_dir": str(sweep.resolve()),
        "ranking": str(path),
        "job_num": int(best["job_num"]),
        "job_dir": str(job.dir),
        "ranked_on_split": str(best["split"]),
        "ranked_jobs": int(len(ranking)),
        "method": str(best["method"]),
        **{k: num(k) for k in ("accuracy", "delta_vs_greedy", "delta_ci_low", "delta_ci_high")},
        "overrides": overrides,
    }
    atomic_write_json(run.path("best_of.json"), info)
    atomic_write_json(run.path("config_resolved.json"), OmegaConf.to_container(new, resolve=True))
    log.info(
        "eval.best_of: running job %d of %s (rank 1 of %d by %s accuracy on %s: %.3f, Δ vs greedy %s) on the "
        "test split with: %s",
        info["job_num"],
        sweep,
        len(ranking),
        info["method"],
        info["ranked_on_split"],
        info["accuracy"],
        "-" if info["delta_vs_greedy"] is None else f"{info['delta_vs_greedy']:+.3f}",
        " ".join(overrides),
    )
    return new


# ---------------------------------------------------------------- the stage


def eval_methods(cfg: DictConfig) -> list[str]:
    """The methods to run, as row labels (method esm -> online.variant), without repeats."""
    out: list[str] = []
    for m in list(cfg.eval.methods) + list(cfg.eval.ablations):
        m = method_label(cfg, m)
        if m not in out:
            out.append(m)
    return out


# ---------------------------------------------------------------- greedy shared by a sweep


@contextlib.contextmanager
def locked(directory: Path):
    """An exclusive (blocking) flock on ``<directory>/.lock``: one writer at a time across jobs."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def shared_greedy_dir(cfg: DictConfig, run: Run, artifact_dir: Path | None) -> Path | None:
    """``<artifact dir>/eval/greedy_<split>_T<T>_<fingerprint hash>/`` when eval.artifact_run_dir
    points at another run: greedy does not depend on online.*, so the jobs of a sweep over one
    set of artifacts generate it once and share it. None: this run's own records only."""
    if not cfg.eval.artifact_run_dir or artifact_dir is None or Path(artifact_dir).resolve() == run.dir.resolve():
        return None
    fp = R.fingerprint(cfg, ["greedy"], None)
    digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]
    from esm_steer.esm import common

    name = f"greedy_{common.eval_split(cfg)}_T{int(cfg.decode.max_new_tokens)}_{digest}"
    return Path(artifact_dir) / artifacts.EVAL_DIR / name


def sync_shared_greedy(
    shared: Path,
    fp: dict,
    appender: JsonlAppender,
    ids: Sequence[str],
    generate_missing: Callable[[JsonlAppender], float] | None = None,
) -> float:
    """Under the shared dir's lock: generate what the shared store lacks (when asked), then copy
    this run's examples from it into the run's own records. Returns the generation seconds."""
    with locked(shared):
        store = R.open_records(shared / artifacts.PER_EXAMPLE, fp)
        wall = generate_missing(store) if generate_missing is not None else 0.0
        have = {r["id"]: r for r in store.records}
        new = [have[i] for i in ids if i in have and i not in appender.done_keys]
        if new:
            appender.extend(new)
            log.info("eval greedy: %d records taken from the shared %s", len(new), shared)
    return wall


def run(cfg: DictConfig, run: Run, engine=None) -> dict:
    """esm-eval. ``engine`` lets tests pass a tiny model. Returns {method: records}."""
    from esm_steer.esm import common

    if OmegaConf.select(cfg, "eval.best_of", default=None):
        cfg = run.cfg = apply_best_of(cfg, run)
    t_max = int(cfg.decode.max_new_tokens)
    methods = eval_methods(cfg)
    require_steering(cfg.model if engine is None else engine, [m for m in methods if m in R.ONLINE_METHODS])
    if cfg.online.variant != "esm" and "esm" in cfg.eval.methods:
        log.info(
            "online.variant=%s: method esm runs that variant (its row is labelled %s)",
            cfg.online.variant,
            cfg.online.variant,
        )

    artifact_dir = None
    if any(m in R.ONLINE_METHODS for m in methods):
        artifact_dir = resolve_artifact_dir(cfg, run)
        log.info("offline artifacts (library/, memory/) read from %s", artifact_dir)

    examples = common.load_examples(cfg, common.eval_split(cfg))
    check_no_overlap(artifact_dir, examples)  # never score questions the artifacts were mined on
    ids = [str(ex.id) for ex in examples]
    log.info(
        "eval: %d examples of %s/%s, T_max=%d, methods %s",
        len(examples),
        cfg.task.dataset,
        common.eval_split(cfg),
        t_max,
        methods,
    )
    tags = {m: R.method_tag(m, t_max, cfg.eval.tag) for m in methods}
    appenders = {
        m: R.open_records(R.per_example_path(run.dir, tags[m]), R.fingerprint(cfg, [m], artifact_dir)) for m in methods
    }
    shared = shared_greedy_dir(cfg, run, artifact_dir) if "greedy" in methods else None
    if shared is not None:  # what another job of the sweep already generated
        sync_shared_greedy(shared, R.fingerprint(cfg, ["greedy"], None), appenders["greedy"], ids)
    todo = any(i not in a.done_keys for a in appenders.values() for i in ids)
    if todo and engine is None:
        engine = common.build_engine(cfg)
    elif not todo:
        log.info("every record is already on disk: only the reports are rewritten")
    prompts = common.prompt_ids(engine, cfg, examples) if todo else []

    by_method: dict[str, list[dict]] = {}
    cache: dict = {}
    for method in methods:
        tag, appender = tags[method], appenders[method]
        wall = 0.0
        if any(i not in appender.done_keys for i in ids):
            generate, to_record = make_generator(method, engine, cfg, artifact_dir, cache)
            # bound now (default args): the function runs within this loop iteration only
            gen = lambda app, generate=generate, to_record=to_record, method=method: generate_records(  # noqa: E731
                examples,
                prompts,
                generate,
                to_record,
                app,
                cfg.task.dataset,
                int(cfg.model.batch_size),
                desc=f"eval {method}",
            )
            if method == "greedy" and shared is not None:  # into the shared store, under its lock
                wall = sync_shared_greedy(shared, R.fingerprint(cfg, ["greedy"], None), appender, ids, gen)
            else:
                wall = gen(appender)
        recs = {r["id"]: r for r in appender.records}
        by_method[method] = [recs[i] for i in ids if i in recs]  # this run's examples, in order
        check_error_rate(method, by_method[method], float(cfg.eval.max_error_rate), appender.path)
        atomic_write_json(
            run.path(artifacts.EVAL_DIR, tag, artifacts.EVAL_META),
            {
                "method": method,
                "model_id": model_id_of(engine, run, tags.values()),
                "T_max": t_max,
                "n": len(by_method[method]),
                "artifact_run_dir": str(artifact_dir) if method != "greedy" else None,
                "online": OmegaConf.to_container(online_cfg_for(cfg, method)) if method != "greedy" else None,
                "shared_greedy_dir": str(shared) if method == "greedy" and shared is not None else None,
                "wall_s_this_invocation": wall,
                "wall_s_total": sum(r.get("wall_s", 0.0) for r in by_method[method]),
            },
        )
        log.info(
            "eval %s: accuracy %.3f on %d (%.1fs generation this run)",
            method,
            summarize(by_method[method])["accuracy"],
            len(by_method[method]),
            wall,
        )

    write_reports(cfg, run, by_method, model_id=model_id_of(engine, run, tags.values()), artifact_dir=artifact_dir)
    warn_truncation(by_method, t_max)
    return by_method


def check_error_rate(method: str, records: Sequence[dict], max_rate: float, path: Path) -> None:
    """RunError (one line) when more than ``max_rate`` of a method's records are errors: a
    systematic failure (OOM, a broken backend) must not pass for low accuracy."""
    errors = [r for r in records if r.get("finish_reason") == R.FINISH_ERROR]
    if records and len(errors) / len(records) > max_rate:
        first = (str(errors[0].get("error") or "").strip().splitlines() or ["?"])[0]
        raise RunError(
            f"eval {method}: {len(errors)} of {len(records)} examples failed (> eval.max_error_rate={max_rate:g}); "
            f"first ({errors[0]['id']}): {first}; records in {path}"
        )


def warn_truncation(by_method: dict, t_max: int) -> None:
    """One warning per method whose responses hit T_max too often: the budget is too small."""
    for method, recs in by_method.items():
        rate = summarize(recs)["truncation_rate"] if recs else 0.0
        if rate > TRUNCATION_WARN_RATE:
            log.warning(
                "eval %s: %.0f%% of %d responses stopped at T_max=%d (finish_reason=length, > %.0f%%): "
                "raise decode.max_new_tokens (default task.budget)",
                method,
                100 * rate,
                len(recs),
                t_max,
                100 * TRUNCATION_WARN_RATE,
            )


def model_id_of(engine, run: Run, tags) -> str | None:
    """The engine's model id; without an engine (nothing left to generate) the one recorded
    in the eval dirs' meta.json, so the tables name the model the same way on every rerun."""
    mid = getattr(getattr(engine, "info", None), "model_id", None)
    if mid:
        return mid
    import json

    for tag in tags:
        meta = run.path(artifacts.EVAL_DIR, tag, artifacts.EVAL_META)
        if meta.exists():
            mid = json.loads(meta.read_text()).get("model_id")
            if mid:
                return mid
    return None


def write_reports(
    cfg: DictConfig, run: Run, by_method: dict, model_id: str | None = None, artifact_dir: Path | None = None
):
    t_max = int(cfg.decode.max_new_tokens)
    model = model_id or str(cfg.model.name_or_path)
    common_args = dict(
        dataset=str(cfg.task.dataset),
        model=model,
        t_max=t_max,
        bootstrap_samples=int(cfg.eval.bootstrap_samples),
        seed=int(cfg.seed),
    )
    main_methods = [m for m in dict.fromkeys(method_label(cfg, m) for m in cfg.eval.methods) if m in by_method]
    main = report.results_table(by_method, main_methods, **common_args)
    report.write_csv(main, run.path(artifacts.TABLES_DIR, artifacts.MAIN_TABLE))
    abl = None
    if cfg.eval.ablations:
        abl_labels = dict.fromkeys(method_label(cfg, m) for m in ["esm", *cfg.eval.ablations])
        abl_methods = [m for m in abl_labels if m in by_method]
        abl = report.results_table(by_method, abl_methods, **common_args)
        report.write_csv(abl, run.path(artifacts.TABLES_DIR, artifacts.ABLATION_TABLE))
    diag = write_diagnostics(
        by_method,
        run.path(artifacts.TABLES_DIR),
        t_max,
        extra={
            "dataset": str(cfg.task.dataset),
            "model": model,
            "artifact_run_dir": str(artifact_dir) if artifact_dir else None,
        },
    )
    figures = (
        ("tokens histogram", lambda: tokens_histogram(by_method, run.path("figures"), t_max)),
        ("accuracy vs budget", lambda: accuracy_vs_budget(by_method, run.path("figures"), t_max)),
        ("steering diagnostics", lambda: steering_diagnostics_figure(diag, run.path("figures"), t_max)),
    )
    for name, draw in figures:
        try:
            draw()
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the tables
            log.warning("%s figure failed: %s: %s", name, type(e).__name__, e)
    esm = method_label(cfg, "esm")
    if "greedy" in by_method and esm in by_method:
        path = write_cases(
            by_method["greedy"],
            by_method[esm],
            run.path("cases", f"cases_T{t_max}.md"),
            t_max,
            int(cfg.eval.max_cases),
            str(cfg.control_points.segment_delimiter),
            esm,
        )
        log.info("cases: %s", path)
    tables = run.path(artifacts.TABLES_DIR)
    log.info("main results (%s):\n%s", tables / artifacts.MAIN_TABLE, report.format_table(main))
    if abl is not None:
        log.info("ablation (%s):\n%s", tables / artifacts.ABLATION_TABLE, report.format_table(abl))
    return main, abl
