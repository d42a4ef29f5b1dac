"""Stage ``eval``: greedy, ESM and its ablations at one budget T_max = decode.max_new_tokens.

Per method, ``eval/<tag>/per_example.jsonl`` is appended one engine-batch chunk at a time,
so a killed run resumes where it stopped. Then, from the records on disk:
``tables/main_results_single.csv``, ``tables/ablation.csv``, ``tables/diagnostics_T<T>.csv|json``,
``figures/tokens_hist_T<T>.pdf|png`` and ``cases/cases_T<T>.md``.

The offline artifacts (library/, memory/) are read in place from the run dir or from
``eval.artifact_run_dir`` (never copied); which one was used is logged and recorded.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from esm_steer.io import JsonlAppender, atomic_write_json
from esm_steer.runs import Run, RunError, resolve_run_path

from esm_steer.evaluate import records as R
from esm_steer.evaluate import report

log = logging.getLogger(__name__)

ARTIFACT_DIRS = ("library", "memory")
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
        log.info("no library/ + memory/ in %s: running %s here first", run.dir, " -> ".join(OFFLINE_STAGES))
        (run_offline or (lambda: run_offline_stages(cfg, run)))()
        if not has_artifacts(run.dir):
            raise RunError(f"the offline stages ran but {run.dir} still lacks library/ or memory/")
        return run.dir
    raise RunError(
        f"no library/ and memory/ in {run.dir}: run `esm-mine ... && esm-select ... outputs.run_id=latest && "
        f"esm-memory ... outputs.run_id=latest` first, or set eval.artifact_run_dir=outputs/<run_name>/latest "
        f"or eval.run_offline_if_missing=true (greedy alone needs none: eval.methods=[greedy])"
    )


def run_offline_stages(cfg: DictConfig, run: Run) -> None:
    import importlib

    for stage in OFFLINE_STAGES:
        t0 = time.perf_counter()
        importlib.import_module(f"esm_steer.esm.{stage}").run(cfg, run)
        log.info("offline stage %s done in %.1fs", stage, time.perf_counter() - t0)


# ---------------------------------------------------------------- generation


def online_cfg_for(cfg: DictConfig, variant: str) -> DictConfig:
    """A copy of cfg.online with ``variant`` set (method esm is always the full policy)."""
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
        log.info("%s: %d of %d examples already in %s; resuming", desc, len(examples) - len(todo), len(examples), appender.path)
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
            log.warning("%s: a chunk of %d failed (%s: %s); retrying one at a time", desc, len(chunk), type(e).__name__, e)
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


# ---------------------------------------------------------------- the stage


def eval_methods(cfg: DictConfig) -> list[str]:
    out: list[str] = []
    for m in list(cfg.eval.methods) + list(cfg.eval.ablations):
        if m not in out:
            out.append(m)
    return out


def run(cfg: DictConfig, run: Run, engine=None) -> dict:
    """esm-eval. ``engine`` lets tests pass a tiny model. Returns {method: records}."""
    from esm_steer.esm import common

    t_max = int(cfg.decode.max_new_tokens)
    methods = eval_methods(cfg)
    if cfg.online.variant != "esm" and "esm" in methods:
        log.info("online.variant=%s is ignored: method esm runs the full policy (ablations: eval.ablations)", cfg.online.variant)

    artifact_dir = None
    if any(m in R.ONLINE_METHODS for m in methods):
        artifact_dir = resolve_artifact_dir(cfg, run)
        log.info("offline artifacts (library/, memory/) read from %s", artifact_dir)

    examples = common.load_examples(cfg, cfg.task.eval_split)
    ids = [str(ex.id) for ex in examples]
    log.info("eval: %d examples of %s/%s, T_max=%d, methods %s", len(examples), cfg.task.dataset, cfg.task.eval_split, t_max, methods)
    tags = {m: R.method_tag(m, t_max, cfg.eval.tag) for m in methods}
    appenders = {m: R.open_records(R.per_example_path(run.dir, tags[m]), R.fingerprint(cfg, [m], artifact_dir)) for m in methods}
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
            wall = generate_records(examples, prompts, generate, to_record, appender, cfg.task.dataset,
                                    int(cfg.model.batch_size), desc=f"eval {method}")  # fmt: skip
        recs = {r["id"]: r for r in appender.records}
        by_method[method] = [recs[i] for i in ids if i in recs]  # this run's examples, in order
        atomic_write_json(
            run.path("eval", tag, "meta.json"),
            {
                "method": method, "model_id": model_id_of(engine, run, tags.values()), "T_max": t_max, "n": len(by_method[method]), "artifact_run_dir": str(artifact_dir) if method != "greedy" else None,
                "online": OmegaConf.to_container(online_cfg_for(cfg, method)) if method != "greedy" else None,
                "wall_s_this_invocation": wall, "wall_s_total": sum(r.get("wall_s", 0.0) for r in by_method[method]),
            },
        )  # fmt: skip
        log.info("eval %s: accuracy %.3f on %d (%.1fs generation this run)", method,
                 report.summarize(by_method[method])["accuracy"], len(by_method[method]), wall)  # fmt: skip

    write_reports(cfg, run, by_method, model_id=model_id_of(engine, run, tags.values()), artifact_dir=artifact_dir)
    return by_method


def model_id_of(engine, run: Run, tags) -> str | None:
    """The engine's model id; without an engine (nothing left to generate) the one recorded
    in the eval dirs' meta.json, so the tables name the model the same way on every rerun."""
    mid = getattr(getattr(engine, "info", None), "model_id", None)
    if mid:
        return mid
    import json

    for tag in tags:
        meta = run.path("eval", tag, "meta.json")
        if meta.exists():
            mid = json.loads(meta.read_text()).get("model_id")
            if mid:
                return mid
    return None


def write_reports(cfg: DictConfig, run: Run, by_method: dict, model_id: str | None = None, artifact_dir: Path | None = None):
    t_max = int(cfg.decode.max_new_tokens)
    model = model_id or str(cfg.model.name_or_path)
    common_args = dict(dataset=str(cfg.task.dataset), model=model, t_max=t_max,
                       bootstrap_samples=int(cfg.eval.bootstrap_samples), seed=int(cfg.seed))  # fmt: skip
    main_methods = [m for m in cfg.eval.methods if m in by_method]
    main = report.results_table(by_method, main_methods, **common_args)
    report.write_csv(main, run.path("tables", "main_results_single.csv"))
    abl = None
    if cfg.eval.ablations:
        abl_methods = [m for m in ["esm", *cfg.eval.ablations] if m in by_method]
        abl = report.results_table(by_method, abl_methods, **common_args)
        report.write_csv(abl, run.path("tables", "ablation.csv"))
    report.write_diagnostics(
        by_method, run.path("tables"), t_max,
        extra={"dataset": str(cfg.task.dataset), "model": model, "artifact_run_dir": str(artifact_dir) if artifact_dir else None},
    )  # fmt: skip
    try:
        report.tokens_histogram(by_method, run.path("figures"), t_max)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the tables
        log.warning("tokens histogram failed: %s: %s", type(e).__name__, e)
    if "greedy" in by_method and "esm" in by_method:
        path = report.write_cases(by_method["greedy"], by_method["esm"], run.path("cases", f"cases_T{t_max}.md"), t_max,
                                  int(cfg.eval.max_cases), str(cfg.control_points.segment_delimiter))  # fmt: skip
        log.info("cases: %s", path)
    log.info("main results (%s):\n%s", run.path("tables", "main_results_single.csv"), report.format_table(main))
    if abl is not None:
        log.info("ablation (%s):\n%s", run.path("tables", "ablation.csv"), report.format_table(abl))
    return main, abl
