"""Config composition, schema errors and semantic checks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
from esm_steer.config import ConfigError, ESMConfig, validate

CONF = Path(esm_steer.cli.__file__).parent / "conf"
GROUPS = ["model", "task", "prompt", "online", "mode", "stage", "experiment"]
ENTRYPOINTS = ["mine", "select", "memory", "eval", "case", "token2048"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(config_name: str = "eval", overrides: list[str] | None = None):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_choice_composes_and_validates(group, option):
    cfg = _compose("eval", [f"{group}={option}"])
    validate(cfg)
    if group == "model":
        assert cfg.model.name_or_path
    if group == "task":
        assert cfg.task.dataset == option or option.startswith(cfg.task.dataset + "_")
    if group == "prompt":
        assert cfg.prompt.template == option
    if group == "online":
        assert cfg.online.variant == option
    if group == "stage":
        assert cfg.stage.name == option


def test_group_options_are_the_documented_ones():
    assert set(options("model")) == {"smollm2_135m", "qwen3_0_6b", "qwen3_4b", "r1_distill_qwen_1_5b"}
    assert {"debug", "gsm8k_recommended_small", "gsm8k_recommended_paper", "suite_tiny"} <= set(options("experiment"))
    assert set(options("online")) == {"esm", "no_memory", "no_probing", "static"}
    assert set(options("mode")) == {"stir", "seed"}
    assert {"gsm8k", "svamp", "arc-c", "math500", "math", "aime_2024", "strategyqa", "dapo_math", "arith"} <= set(
        options("task")
    )


# the five mechanisms of STIR (docs/method.md "STIR mode") and the seed's first reading of each
MECHANISMS = {
    "offline_mine.vector": ("control_point", "segment_mean"),
    "control_points.first_m": (1, 0),
    "offline_memory.entries": ("contrast", "states"),
    "offline_memory.null_anchors": (True, False),
    "offline_memory.center_keys": (False, True),
    "online.null_score": ("anchors", "zero"),
    "online.retrieve_same_m": (True, False),
    "online.inject": ("impulse", "segment"),
    "online.probe_scale": (1.0, None),
}


def test_stir_mode_is_the_default_and_mode_seed_the_earlier_reading():
    stir, seed, paper = _compose("eval"), _compose("eval", ["mode=seed"]), _compose("eval", ["experiment=stir_math"])
    for key, (stir_value, seed_value) in MECHANISMS.items():
        assert OmegaConf.select(stir, key) == stir_value == OmegaConf.select(paper, key), key
        assert OmegaConf.select(seed, key) == seed_value, key
    validate(seed)
    # STIR's released online values are the defaults; mode=seed restores the seed's
    assert [stir.online[k] for k in ("k_retrieve", "L", "probe_tokens", "beta", "rho")] == [8, 4, 4, 2.0, 0.1]
    assert [seed.online[k] for k in ("k_retrieve", "L", "probe_tokens", "beta", "rho")] == [16, 3, 6, 1.0, 1.0]
    # an experiment's own values win over the mode's; the mode's over the schema's
    debug_seed = _compose("eval", ["mode=seed", "experiment=debug"])
    assert debug_seed.online.L == 1 and debug_seed.online.k_retrieve == 8 and debug_seed.online.inject == "segment"


@pytest.mark.parametrize("entry", ENTRYPOINTS)
def test_each_entrypoint_sets_its_stage(entry):
    cfg = _compose(entry)
    assert cfg.stage.name == ("all" if entry == "token2048" else entry)


def test_seed_schema_keys_exist():
    cfg = _compose("eval")
    for key in [
        "seed",
        "model.name_or_path",
        "model.gguf_file",
        "model.dtype",
        "model.backend",
        "model.device",
        "model.steer_layer",
        "model.gpu_memory_utilization",
        "model.max_model_len",
        "model.max_num_seqs",
        "model.tensor_parallel_size",
        "task.dataset",
        "task.data_root",
        "task.train_split",
        "task.eval_split",
        "task.max_train_examples",
        "task.max_eval_examples",
        "prompt.template",
        "decode.max_new_tokens",
        "decode.temperature",
        "decode.top_p",
        "control_points.segment_delimiter",
        "control_points.M",
        "offline_mine.K",
        "offline_mine.K_pos",
        "offline_mine.K_neg",
        "offline_mine.max_new_tokens",
        "offline_mine.keep_top_C",
        "offline_mine.require_correct_and_incorrect",
        "offline_mine.pos_source",
        "offline_mine.length_penalty",
        "offline_select.B",
        "offline_select.method",
        "offline_select.lambda_diversity",
        "offline_select.min_per_control_point",
        "offline_memory.normalize_keys",
        "online.variant",
        "online.k_retrieve",
        "online.L",
        "online.probe_tokens",
        "online.beta",
        "online.rho",
        "online.k_scale",
        "online.tau_null",
        "online.min_sim",
        "online.min_entries",
        "eval.methods",
        "eval.ablations",
        "eval.artifact_run_dir",
        "outputs.root_dir",
        "outputs.run_name",
        "outputs.run_id",
        "token2048.n_questions",
        "token2048.n_prefix",
        "token2048.prefix_tokens",
        "token2048.n_cont",
        "token2048.max_new_tokens",
        "token2048.shard_index",
        "token2048.num_shards",
    ]:
        assert OmegaConf.select(cfg, key, default="MISSING!") != "MISSING!", key
    assert cfg.control_points.segment_delimiter == "\n\n"
    # the seed's decode.logprobs is gone: nothing read it (the engines always return logprobs)
    assert OmegaConf.select(cfg, "decode.logprobs", default="MISSING!") == "MISSING!"


@pytest.mark.parametrize("task,difficulty", [("arith", 1), ("arith_d2", 2)])
def test_experiments_keep_the_swept_tasks_own_values(task, difficulty):
    for exp in ("suite_tiny", "debug"):
        cfg = _compose("eval", [f"experiment={exp}", f"task={task}"])
        assert cfg.task.dataset == "arith" and cfg.task.difficulty == difficulty


def test_experiment_overrides_groups():
    cfg = _compose("eval", ["experiment=gsm8k_recommended_small"])
    assert cfg.model.name_or_path == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.task.dataset == "gsm8k" and cfg.prompt.template == "gsm8k_0shot_compact"
    # a command-line override still wins over the experiment
    cfg = _compose("eval", ["experiment=debug", "decode.max_new_tokens=7"])
    assert cfg.decode.max_new_tokens == 7 and cfg.outputs.run_name == "debug"


@pytest.mark.parametrize(
    "override,key",
    [
        ("offline_mine.K=-1", "offline_mine.K"),
        ("offline_mine.K_pos=9", "offline_mine.K_pos"),  # K_pos <= K (8)
        ("decode.top_p=0", "decode.top_p"),
        ("decode.top_p=1.5", "decode.top_p"),
        ("control_points.M=0", "control_points.M"),
        ("offline_select.B=2", "offline_select.B"),  # B >= min_per_control_point * M
        ("offline_select.method=greedy", "offline_select.method"),
        ("online.min_sim=2", "online.min_sim"),
        ("model.vllm_hidden_states=hook", "model.vllm_hidden_states"),
        ("model.vllm_hidden_states=capture", "model.vllm_hidden_states"),  # compiled: the hook cannot run
        ("token2048.shard_index=3", "token2048.shard_index"),
    ],
)
def test_semantic_checks_name_the_key(override, key):
    cfg = _compose("eval", [override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith(key + "=") and "\n" not in msg


def test_an_unregistered_backend_is_one_line_listing_the_engines():
    from esm_steer.engine.registry import engine_class

    with pytest.raises(ConfigError, match=r"^model.backend='tgi' is not a registered engine: one of hf, vllm$"):
        engine_class(_compose("eval", ["model.backend=tgi"]).model.backend)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "esm-eval"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["offline_mine.K=-1"], "offline_mine.K=-1 is out of range"),
        (["nosuchkey=1"], "unknown config key 'nosuchkey'"),
        (["model.nosuch=1"], "Key 'nosuch' not in 'ModelConfig'"),
        (["offline_mine.K=abc"], "could not be converted to Integer"),
        # an unknown option of any group, the optional experiment included (Hydra would skip it)
        (["experiment=no_such_preset"], "unknown experiment 'no_such_preset' (options: debug,"),
        (["--cfg", "job", "experiment=stir_mth"], "unknown experiment 'stir_mth' (options: debug,"),
        (["task=gsm9k"], "unknown task 'gsm9k' (options: aime_2024, arc-c, arith,"),
        (["model.backend=tgi"], "model.backend='tgi' is not a registered engine: one of hf, vllm"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    r = _cli(args + [f"outputs.root_dir={tmp_path}/out"], tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert lines[0].startswith("esm-eval: ")


def test_cli_help_lists_groups(tmp_path):
    r = _cli(["--help"], tmp_path)
    assert r.returncode == 0
    for g in ["model:", "task:", "prompt:", "online:", "stage:", "experiment:"]:
        assert g in r.stdout
    assert "qwen3_4b" in r.stdout and "gsm8k_recommended_paper" in r.stdout


def test_cli_cfg_job_prints_composed_config(tmp_path):
    r = _cli(["--cfg", "job", "task=gsm8k", "model=qwen3_4b"], tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.task.dataset == "gsm8k" and cfg.model.name_or_path == "Qwen/Qwen3-4B-Instruct-2507"


SEED_BUDGETS = {
    "gsm8k": 1024,
    "svamp": 1024,
    "arc-c": 1024,
    "strategyqa": 1024,
    "math500": 4096,
    "math": 4096,
    "aime_2024": 4096,
    "dapo_math": 4096,
}


@pytest.mark.parametrize("task", options("task"))
def test_task_budget_is_the_default_of_both_budgets(task):
    from esm_steer.config import TaskConfig

    cfg = _compose("eval", [f"task={task}"])
    assert cfg.task.budget == SEED_BUDGETS.get(task, TaskConfig.budget)  # arith: the schema's
    assert cfg.decode.max_new_tokens == cfg.offline_mine.max_new_tokens == cfg.task.budget


def test_budget_overrides_and_presets_keep_their_own():
    cfg = _compose("mine", ["task=gsm8k", "decode.max_new_tokens=300"])
    assert (cfg.decode.max_new_tokens, cfg.offline_mine.max_new_tokens) == (300, 1024)
    cfg = _compose("eval", ["task=math500", "task.budget=5000"])
    assert (cfg.decode.max_new_tokens, cfg.offline_mine.max_new_tokens) == (5000, 5000)
    for preset, t in (("debug", 64), ("gsm8k_recommended_small", 1024), ("gsm8k_recommended_paper", 2048)):
        cfg = _compose("eval", [f"experiment={preset}"])
        assert (cfg.decode.max_new_tokens, cfg.offline_mine.max_new_tokens) == (t, t), preset
    with pytest.raises(ConfigError, match=r"task\.budget=0"):
        validate(_compose("eval", ["task.budget=0"]))


# ---------------------------------------------------------------- one source of defaults

SCHEMA_OF_GROUP = {"model": "ModelConfig", "task": "TaskConfig", "online": "OnlineConfig", "prompt": "PromptConfig"}


@pytest.mark.parametrize("group,option", [(g, o) for g in (*SCHEMA_OF_GROUP, "stage") for o in options(g)])
def test_group_yaml_holds_only_what_differs_from_the_schema(group, option):
    import esm_steer.config as schema

    cls = getattr(schema, SCHEMA_OF_GROUP.get(group, "StageConfig"))
    defaults = OmegaConf.to_container(OmegaConf.structured(cls))
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml") or OmegaConf.create())
    raw.pop("defaults", None)
    same = sorted(k for k, v in raw.items() if k in defaults and v == defaults[k])
    assert not same, f"conf/{group}/{option}.yaml repeats the schema's {cls.__name__} defaults of {same}"


def test_the_default_groups_are_the_schema():
    from esm_steer.config import ModelConfig, OnlineConfig, TaskConfig

    cfg = _compose("eval")
    for node, cls in ((cfg.model, ModelConfig), (cfg.online, OnlineConfig), (cfg.task, TaskConfig)):
        assert OmegaConf.to_container(node, resolve=True) == OmegaConf.to_container(OmegaConf.structured(cls)), cls


def test_method_names_are_the_registered_strategies():
    from esm_steer.esm.strategies import STRATEGIES
    from esm_steer.evaluate.methods import check_methods

    check_methods(_compose("eval", [f"eval.methods=[greedy,{','.join(STRATEGIES)}]"]))
    for bad in (["eval.methods=[greedy,nope]"], ["eval.ablations=[greedy]"], ["online.variant=greedy"]):
        with pytest.raises(ConfigError, match="^" + bad[0].split("=")[0].replace(".", r"\.") + ": unknown online"):
            check_methods(_compose("eval", bad))


DOCUMENTED_DEFAULT = re.compile(r"`([a-z_0-9]+\.[a-z_A-Z0-9]+)`\s+\(default\s+`?([^)`]+)`?\)")


@pytest.mark.parametrize("doc", ["README.md", "docs/method.md"])
def test_documented_defaults_are_the_schemas(doc):
    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    schema = OmegaConf.structured(ESMConfig)
    found = DOCUMENTED_DEFAULT.findall(text)
    assert found, f"{doc} documents no default as `key` (default value)"
    for key, value in found:
        want = OmegaConf.select(schema, key, throw_on_missing=False)
        got = json.loads(value) if value.startswith('"') else yaml.safe_load(value)
        assert got == want, f"{doc}: `{key}` (default {value}) but the schema's default is {want!r}"
