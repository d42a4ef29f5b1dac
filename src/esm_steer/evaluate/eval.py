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

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from esm_steer import runtime
from esm_steer.config import BASELINE
from esm_steer.engine import require_steering
from esm_steer.esm import artifacts
from esm_steer.esm.memory_index import check_online
from esm_steer.evaluate import records as R
from esm_steer.evaluate import report
from esm_steer.evaluate.best_of import apply_best_of
from esm_steer.evaluate.case_markdown import write_cases
from esm_steer.evaluate.diagnostics import write_diagnostics
from esm_steer.evaluate.figures import accuracy_vs_budget, steering_diagnostics_figure, tokens_histogram
from esm_steer.evaluate.methods import (
    ESM,
    eval_methods,
    generate_records,
    make_generator,
    method_label,
    online_cfg_for,
    online_methods,
)
from esm_steer.evaluate.offline import resolve_artifact_dir
from esm_steer.evaluate.shared_greedy import shared_greedy_dir, sync_shared_greedy
from esm_steer.evaluate.stats import summarize
from esm_steer.io import atomic_write_json
from esm_steer.runs import Run, RunError
from esm_steer.runtime import TRUNCATION_WARN_RATE
from esm_steer.splits import check_no_overlap

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run: Run, engine=None) -> dict:
    """esm-eval. ``engine`` lets tests pass a tiny model. Returns {method: records}."""
    if OmegaConf.select(cfg, "eval.best_of", default=None):
        cfg = run.cfg = apply_best_of(cfg, run)
    t_max = int(cfg.decode.max_new_tokens)
    methods = eval_methods(cfg)
    require_steering(cfg.model if engine is None else engine, online_methods(methods))
    if method_label(cfg, ESM) != ESM and ESM in cfg.eval.methods:
        log.info(
            "online.variant=%s: method esm runs that variant (its row is labelled %s)",
            cfg.online.variant,
            cfg.online.variant,
        )

    artifact_dir = None
    if online_methods(methods):
        artifact_dir = resolve_artifact_dir(cfg, run)
        log.info("offline artifacts (library/, memory/) read from %s", artifact_dir)
        check_online(cfg.online, artifact_dir)

    examples = runtime.load_examples(cfg, runtime.eval_split(cfg))
    # never score questions the artifacts were mined on (unless told to: STIR's split, marked)
    overlap = check_no_overlap(artifact_dir, examples, allow=bool(cfg.eval.allow_mining_overlap))
    ids = [str(ex.id) for ex in examples]
    log.info(
        "eval: %d examples of %s/%s, T_max=%d, methods %s",
        len(examples),
        cfg.task.dataset,
        runtime.eval_split(cfg),
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
        engine = runtime.build_engine(cfg)
    elif not todo:
        log.info("every record is already on disk: only the reports are rewritten")
    prompts = runtime.prompt_ids(engine, cfg, examples) if todo else []

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
                cfg.task.grader,
                int(cfg.model.batch_size),
                desc=f"eval {method}",
            )
            if method == BASELINE and shared is not None:  # into the shared store, under its lock
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
                "shared_greedy_dir": str(shared) if method == BASELINE and shared is not None else None,
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

    write_reports(
        cfg,
        run,
        by_method,
        model_id=model_id_of(engine, run, tags.values()),
        artifact_dir=artifact_dir,
        mined_overlap=overlap,
    )
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
    for tag in tags:
        meta = run.path(artifacts.EVAL_DIR, tag, artifacts.EVAL_META)
        if meta.exists():
            mid = json.loads(meta.read_text()).get("model_id")
            if mid:
                return mid
    return None


def write_reports(
    cfg: DictConfig,
    run: Run,
    by_method: dict,
    model_id: str | None = None,
    artifact_dir: Path | None = None,
    mined_overlap: int = 0,
):
    """Tables, diagnostics, figures and cases. ``mined_overlap``: scored questions the artifacts
    were mined on (eval.allow_mining_overlap): a ``mined_overlap`` column marks the steered rows."""
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
    if mined_overlap:
        main["mined_overlap"] = [0 if m == BASELINE else int(mined_overlap) for m in main["method"]]
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
