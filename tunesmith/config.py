"""Run configuration: dataclass sections, read from YAML plus `dotted.key=value` overrides.

Every problem in a config (unknown keys, wrong types, values out of range) is collected and
reported together in one `TunesmithError`, before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunesmith.errors import TunesmithError

DEFAULT_METRICS = ("exact_match", "contains")  # of the report built into train, `tunesmith eval` and `compare`

TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]
# What each tracker of `log.report_to` imports, and the extra that installs it (tensorboardX is a dependency).
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboardX",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}
# MLflow's local store (a SQLite file in the run folder) needs the full mlflow package, not mlflow-skinny.
MLFLOW_LOCAL_STORE_MODULES = ("sqlalchemy", "alembic")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(kw_only=True)
class LoadConfig:
    """How the model is loaded."""

    trust_remote_code: bool = field(default=False, metadata=_doc("run Python code shipped with a hub model; off unless you trust it"))
    allow_pickle: bool = field(default=False, metadata=_doc("accept pickle `.bin` weights (they can run code when loaded); safetensors only otherwise"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata=_doc("auto = float32 on CPU, bfloat16 on CUDA"))
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(default="sdpa", metadata=_doc("attention kernel; packing stays block-diagonal on each"))
    quantize: Literal["nf4", "int8"] | None = field(default=None, metadata=_doc("hold the frozen base weights in 4-bit NF4 or 8-bit (bitsandbytes; QLoRA) with full-precision LoRA on top; needs lora; merged outputs are saved de-quantized in the model's dtype; null = no quantization"))


@dataclass(kw_only=True)
class DataConfig:
    """Where the data is and how it is read."""

    train: str | None = field(default=None, metadata=_doc("training data: .jsonl/.json/.csv/.parquet file, a saved HF dataset folder, or a hub dataset name"))
    eval: str | None = field(default=None, metadata=_doc("held-out data for eval loss and perplexity, same formats as `train`"))
    test: str | None = field(default=None, metadata=_doc("held-out rows with reference answers for the base-vs-tuned report (sft data.eval serves when unset); for pretrain, held-out plain text whose perplexity the report compares (data.eval serves when unset)"))
    format: Literal["auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt"] = field(default="auto", metadata=_doc("data format; auto detects it from the fields"))
    overflow: Literal["truncate", "drop"] = field(default="truncate", metadata=_doc("what to do with samples longer than train.max_length"))
    split: str = field(default="train", metadata=_doc("split to read from an HF dataset"))


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapter settings (`lora: null` trains all weights instead)."""

    r: int = field(default=16, metadata=_doc("adapter rank"))
    alpha: float = field(default=32, metadata=_doc("scaling numerator: the update is scaled by alpha / r"))
    dropout: float = field(default=0.05, metadata=_doc("dropout on the adapter input"))
    target_modules: list[str] | str = field(default="all-linear", metadata=_doc("module names to adapt, or 'all-linear'"))
    use_dora: bool = field(default=False, metadata=_doc("DoRA (Liu et al. 2024): a learned magnitude per output feature on top of the LoRA direction (peft's use_dora)"))
    use_rslora: bool = field(default=False, metadata=_doc("rank-stabilised LoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of alpha / r (peft's use_rslora)"))


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    max_steps: int | None = field(default=None, metadata=_doc("optimizer steps; overrides epochs when set"))
    epochs: float = field(default=1, metadata=_doc("passes over the training data when max_steps is not set"))
    batch_size: int = field(default=8, metadata=_doc("rows per micro-batch on each rank"))
    grad_accum: int = field(default=1, metadata=_doc("micro-batches accumulated per optimizer step"))
    forward_tokens: int | None = field(default=None, metadata=_doc("most tokens (rows x padded length) in one forward/backward pass: a micro-batch is run in passes that fit, with the same maths; null = 512 on CPU, 16384 on GPU"))
    lr: float = field(default=2e-4, metadata=_doc("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW decoupled weight decay"))
    warmup_ratio: float = field(default=0.05, metadata=_doc("fraction of steps with linear warm-up before the cosine decay"))
    min_lr_ratio: float = field(default=0.1, metadata=_doc("the cosine decays to lr * min_lr_ratio"))
    max_grad_norm: float | None = field(default=1.0, metadata=_doc("clip the global gradient norm to this; null turns clipping off"))
    max_length: int = field(default=1024, metadata=_doc("tokens per row (and the longest sample kept whole)"))
    packing: bool = field(default=True, metadata=_doc("fill rows with whole documents that never attend to each other"))
    seed: int = field(default=42, metadata=_doc("seed for data order, initialisation and dropout"))
    eval_every: int = field(default=50, metadata=_doc("steps between eval-loss passes on data.eval (0 = only at the end)"))
    save_every: int = field(default=100, metadata=_doc("steps between checkpoints (0 = only at the end)"))
    save_every_minutes: float = field(default=30, metadata=_doc("also checkpoint when this many minutes have passed since the last checkpoint, so a slow run never loses more (0 = off)"))
    keep_checkpoints: int = field(default=2, metadata=_doc("how many of the newest checkpoints to keep"))
    log_every: int = field(default=1, metadata=_doc("steps between metric lines"))
    gradient_checkpointing: bool = field(default=False, metadata=_doc("recompute activations in backward to save memory"))
    distributed: Literal["ddp", "fsdp"] = field(default="ddp", metadata=_doc("how several ranks (torchrun) share the work: ddp = a whole copy of the model per rank; fsdp = parameters, gradients and optimizer state sharded over ranks with FSDP2, per decoder layer, and checkpoints written sharded with Distributed Checkpoint (a run may resume on another number of ranks); sft, pretrain, reward and dpo"))
    max_nonfinite_steps: int = field(default=3, metadata=_doc("a step whose loss or gradient norm is NaN or infinite is skipped (no update) and counted; this many in a row, or one at the first step, stop the run"))


@dataclass(kw_only=True)
class DpoConfig:
    """Learning from preference pairs directly (method: dpo)."""

    loss: Literal["sigmoid", "cdpo", "ipo", "simpo", "orpo"] = field(default="sigmoid", metadata=_doc("sigmoid = DPO (Rafailov 2023); cdpo = conservative DPO with label_smoothing; ipo (Azar 2023); simpo (Meng 2024) and orpo (Hong 2024) need no reference"))
    beta: float = field(default=0.1, metadata=_doc("strength of the implicit reward: how far the policy may move from the reference (SimPO's reward scale; try 2.0 there)"))
    label_smoothing: float = field(default=0.1, metadata=_doc("cdpo: the assumed share of pairs whose labels are flipped"))
    simpo_gamma: float = field(default=0.5, metadata=_doc("simpo: the target reward margin"))
    orpo_lambda: float = field(default=0.1, metadata=_doc("orpo: weight of the odds-ratio term added to the SFT loss"))
    precompute_ref: bool = field(default=False, metadata=_doc("compute the reference log-probs once before training; full fine-tuning then needs no second model in memory"))
    nll_weight: float = field(default=0.0, metadata=_doc("add this times the chosen answer's mean token NLL to sigmoid/cdpo/ipo/simpo losses (RPO, Pang et al. 2024): keeps DPO from pushing the chosen answer's likelihood down with the rejected one"))


@dataclass(kw_only=True)
class RewardConfig:
    """Training a reward model on preference pairs (method: reward)."""

    use_margin: bool = field(default=True, metadata=_doc("subtract a pair's `margin` field (when the data has one) inside the Bradley-Terry loss, as in Llama 2"))


@dataclass(kw_only=True)
class RLConfig:
    """Rollouts and rewards of the RL methods (grpo, ppo); train.batch_size counts prompts per step and rank."""

    rewards: list[str] = field(default_factory=list, metadata=_doc("reward functions: exact_match, contains, json_equal, regex:PATTERN, length_penalty:N, or module:function(prompts, completions, **fields) -> list[float]"))
    reward_weights: list[float] | None = field(default=None, metadata=_doc("one weight per entry of rewards (default 1 each)"))
    reward_model: str | None = field(default=None, metadata=_doc("a `method: reward` run (or its reward_model/ folder) that scores every completion"))
    reward_model_weight: float = field(default=1.0, metadata=_doc("weight of the reward model's score in the total reward"))
    group_size: int = field(default=4, metadata=_doc("completions sampled per prompt (GRPO's G; PPO usually 1)"))
    max_new_tokens: int = field(default=64, metadata=_doc("longest completion"))
    temperature: float = field(default=1.0, metadata=_doc("sampling temperature of the rollouts (must be above 0)"))
    top_p: float = field(default=1.0, metadata=_doc("nucleus sampling of the rollouts (1 = off)"))
    top_k: int = field(default=0, metadata=_doc("top-k sampling of the rollouts (0 = off)"))
    stop: list[str] = field(default_factory=list, metadata=_doc("a completion ends at the first of these strings"))
    update_epochs: int = field(default=1, metadata=_doc("passes over each batch of rollouts (GRPO's mu, PPO epochs)"))
    minibatch_size: int | None = field(default=None, metadata=_doc("completions per optimizer update, drawn from every rank's; null = one update over all of a step's completions per pass"))
    micro_batch_size: int = field(default=8, metadata=_doc("completions per forward pass on each rank (memory only; the maths is the same)"))
    share_prompts: bool = field(default=True, metadata=_doc("train the completions of one prompt as a tree that holds the prompt once (same maths, less compute; needs SDPA attention, used when the model has it)"))
    clip_eps: float = field(default=0.2, metadata=_doc("PPO/GRPO ratio clip epsilon"))
    kl_coef: float = field(default=0.04, metadata=_doc("weight of the KL penalty to the reference (GRPO's beta; PPO's initial coefficient)"))
    samples_every: int = field(default=10, metadata=_doc("write sampled completions with their rewards to samples.jsonl every N steps (0 = never)"))


@dataclass(kw_only=True)
class GrpoConfig:
    """Group relative policy optimisation (method: grpo)."""

    scale_rewards: bool = field(default=True, metadata=_doc("divide advantages by the group's reward std (Shao 2024); false = Dr. GRPO (Liu 2025)"))
    loss_normalization: Literal["token", "sequence", "constant"] = field(default="token", metadata=_doc("token: mean over all completion tokens of the batch (DAPO, Yu 2025); sequence: mean per completion, then over completions (GRPO, Shao 2024); constant: sum over tokens / (completions x max_new_tokens) (Dr. GRPO, Liu 2025)"))


@dataclass(kw_only=True)
class PpoConfig:
    """PPO with a value head, as in InstructGPT (method: ppo)."""

    gamma: float = field(default=1.0, metadata=_doc("discount of the per-token rewards"))
    lam: float = field(default=0.95, metadata=_doc("GAE lambda"))
    vf_coef: float = field(default=0.1, metadata=_doc("weight of the value loss"))
    value_clip: float = field(default=0.2, metadata=_doc("clip range of the value change around the rollout's values"))
    adaptive_kl: bool = field(default=False, metadata=_doc("steer the KL coefficient toward kl_target (Ziegler 2019); false = fixed rl.kl_coef"))
    kl_target: float = field(default=6.0, metadata=_doc("adaptive KL: target KL per completion"))
    kl_horizon: int = field(default=10000, metadata=_doc("adaptive KL: horizon in completions"))
    whiten_advantages: bool = field(default=True, metadata=_doc("normalise advantages to mean 0, std 1 over the batch"))
    whiten_rewards: bool = field(default=False, metadata=_doc("scale the scores to std 1 over the batch before GAE"))


@dataclass(kw_only=True)
class EvalConfig:
    """The base-vs-tuned evaluation a run ends with (on data.test, or on sft's data.eval; a pretrain run's on held-out text)."""

    before: bool = field(default=True, metadata=_doc("evaluate the base model before the first step and write the comparison report"))
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS), metadata=_doc("generation metrics: exact_match, contains, json_equal, or module:function"))
    max_new_tokens: int = field(default=128, metadata=_doc("longest generated answer"))
    max_rows: int | None = field(default=200, metadata=_doc("evaluate at most this many rows (null = all)"))
    batch_size: int = field(default=16, metadata=_doc("prompts generated together"))


@dataclass(kw_only=True)
class OutputConfig:
    """What the run writes at the end."""

    merge: bool = field(default=True, metadata=_doc("also save the LoRA adapter merged into the base as a plain HF model"))
    save_adapter: bool = field(default=True, metadata=_doc("save the LoRA adapter in PEFT format"))
    gguf: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] | None = field(default=None, metadata=_doc("also export the final model to GGUF at this precision, for llama.cpp, Ollama and LM Studio: gguf/model.<quant>.gguf and an Ollama Modelfile in the run folder, checked against the model (`tunesmith export`); null = no export"))


@dataclass(kw_only=True)
class LogConfig:
    """Where the metrics of a run go besides metrics.jsonl: the experiment trackers."""

    report_to: list[TrackerName] = field(default_factory=lambda: ["tensorboard"], metadata=_doc("trackers that get the metrics of metrics.jsonl at the same steps, the config as parameters, and at the end the summary and the report: tensorboard, wandb (offline unless logged in), mlflow (a SQLite store in the run folder unless MLFLOW_TRACKING_URI is set), trackio (local); [] = metrics.jsonl only"))
    project: str = field(default="tunesmith", metadata=_doc("the W&B project, MLflow experiment and Trackio project runs are filed under"))
    run_name: str | None = field(default=None, metadata=_doc("the run's name in the trackers; null = the run folder's name"))


@dataclass(kw_only=True)
class Config:
    """One fine-tuning run."""

    method: Literal["sft", "pretrain", "reward", "dpo", "grpo", "ppo"] = field(default="sft", metadata=_doc("sft (prompt -> response, chats), pretrain (plain domain text), reward (a reward model from preference pairs), dpo (preference pairs, directly), grpo or ppo (RL on prompts with rewards)"))
    model: str = field(default="default", metadata=_doc("local HF folder, hub id, .gguf file, or 'default' (SmolLM2-135M-Instruct)"))
    output_dir: str = field(default="runs/run", metadata=_doc("run folder: checkpoints, outputs, metrics, logs"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_doc("data section"))
    lora: LoraConfig | None = field(default_factory=LoraConfig, metadata=_doc("LoRA section; null = full fine-tuning"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_doc("training loop section"))
    load: LoadConfig = field(default_factory=LoadConfig, metadata=_doc("model loading section"))
    dpo: DpoConfig = field(default_factory=DpoConfig, metadata=_doc("dpo section"))
    reward: RewardConfig = field(default_factory=RewardConfig, metadata=_doc("reward-model section"))
    rl: RLConfig = field(default_factory=RLConfig, metadata=_doc("rollouts and rewards of grpo and ppo"))
    grpo: GrpoConfig = field(default_factory=GrpoConfig, metadata=_doc("grpo section"))
    ppo: PpoConfig = field(default_factory=PpoConfig, metadata=_doc("ppo section"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_doc("base-vs-tuned evaluation section"))
    output: OutputConfig = field(default_factory=OutputConfig, metadata=_doc("outputs section"))
    log: LogConfig = field(default_factory=LogConfig, metadata=_doc("experiment trackers section"))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, as saved in the run folder."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from plain data


def type_name(tp: Any, *, quote: bool = True) -> str:
    """A field's type in words: `int or null`, `list of str`, `'auto' | 'float32'` (choices unquoted with quote=False)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if quote else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a, quote=quote) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0], quote=quote)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`, appending a message to `problems` when it cannot be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, where, trial)
            if not trial:
                return out
        problems.append(f"{where}: expected {type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected {type_name(tp)}, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a section (mapping of keys), got {value!r}")
            return None
        return _build(tp, value, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{where}: expected {type_name(tp)}, got {value!r}")
    return None


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            problems.append(f"{where}: unknown key (known keys here: {known})")
            continue
        kwargs[key] = _coerce(value, hints[key], where, problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable through earlier problems
        problems.append(f"{prefix or 'config'}: {exc}")
        return cls()


def _check(cfg: Config, problems: list[str]) -> None:
    """Value checks that types alone cannot express."""
    t = cfg.train
    positive = {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.max_length": t.max_length,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.log_every": t.log_every,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
    }
    for where, value in positive.items():
        if isinstance(value, int) and value < 1:
            problems.append(f"{where}: must be at least 1, got {value}")
    if t.forward_tokens is not None and t.forward_tokens < 1:
        problems.append(f"train.forward_tokens: must be at least 1 (or null for the device's default), got {t.forward_tokens}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps: must be at least 1 (or null to use train.epochs), got {t.max_steps}")
    if isinstance(t.epochs, float) and t.epochs <= 0:
        problems.append(f"train.epochs: must be positive, got {t.epochs}")
    if isinstance(t.save_every_minutes, float) and t.save_every_minutes < 0:
        problems.append(f"train.save_every_minutes: must be 0 (off) or more, got {t.save_every_minutes}")
    if isinstance(t.lr, float) and t.lr <= 0:
        problems.append(f"train.lr: must be positive, got {t.lr}")
    if isinstance(t.warmup_ratio, float) and not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if isinstance(t.min_lr_ratio, float) and not 0 <= t.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    for where, value in (("train.eval_every", t.eval_every), ("train.save_every", t.save_every)):
        if isinstance(value, int) and value < 0:
            problems.append(f"{where}: must be 0 or more, got {value}")
    if cfg.load.quantize is not None and t.distributed == "fsdp":
        problems.append(f"load.quantize: {cfg.load.quantize!r} runs with train.distributed=ddp (each rank holds the whole "
                        "quantized base); sharding bitsandbytes weights with FSDP is not supported; set train.distributed=ddp, or load.quantize=null for fsdp")
    if cfg.load.quantize is not None and cfg.lora is None:
        problems.append(f"load.quantize: {cfg.load.quantize!r} freezes the base weights in low precision, so it needs "
                        "LoRA adapters to train; set a lora section (e.g. lora.r=16), or load.quantize=null for full "
                        "fine-tuning")
    if cfg.lora is not None:
        if isinstance(cfg.lora.r, int) and cfg.lora.r < 1:
            problems.append(f"lora.r: must be at least 1, got {cfg.lora.r}")
        if isinstance(cfg.lora.dropout, float) and not 0 <= cfg.lora.dropout < 1:
            problems.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    d = cfg.dpo
    if isinstance(d.beta, float) and d.beta <= 0:
        problems.append(f"dpo.beta: must be positive, got {d.beta}")
    if isinstance(d.label_smoothing, float) and not 0 <= d.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
    if isinstance(d.nll_weight, float) and d.nll_weight < 0:
        problems.append(f"dpo.nll_weight: must be 0 or more, got {d.nll_weight}")
    if isinstance(d.orpo_lambda, float) and d.orpo_lambda < 0:
        problems.append(f"dpo.orpo_lambda: must be 0 or more, got {d.orpo_lambda}")
    if cfg.method in ("grpo", "ppo") and t.distributed == "fsdp":
        problems.append(f"train.distributed: fsdp covers sft, pretrain, reward and dpo; method {cfg.method} runs with "
                        "ddp (set train.distributed=ddp)")
    if cfg.method in ("grpo", "ppo"):
        _check_rl(cfg, problems)
    if cfg.eval.max_new_tokens < 1:
        problems.append(f"eval.max_new_tokens: must be at least 1, got {cfg.eval.max_new_tokens}")
    if cfg.eval.max_rows is not None and cfg.eval.max_rows < 1:
        problems.append(f"eval.max_rows: must be at least 1 (or null for all rows), got {cfg.eval.max_rows}")
    if cfg.eval.batch_size < 1:
        problems.append(f"eval.batch_size: must be at least 1, got {cfg.eval.batch_size}")
    _check_trackers(cfg.log, problems)
    if cfg.output.gguf is not None:
        if cfg.method == "reward":
            problems.append("output.gguf: a reward model scores answers and does not write them, so it has no GGUF "
                            "export; set output.gguf=null")
        elif cfg.lora is not None and not (cfg.output.merge or cfg.output.save_adapter):
            problems.append("output.gguf: with output.merge and output.save_adapter both false the run keeps no model "
                            "to export; turn one of them on")
    if not cfg.data.train:
        problems.append("data.train: required; give the training data file (e.g. data.train=train.jsonl)")
    if not cfg.model:
        problems.append("model: required; a local folder, a hub id, a .gguf file or 'default'")
    if not cfg.output_dir:
        problems.append("output_dir: required; the folder the run writes to")


def module_missing(name: str) -> bool:
    """True when the module `name` cannot be imported here (looked up without importing it)."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a parent package that fails, or a module blanked out in sys.modules
        return True


def _check_trackers(log: LogConfig, problems: list[str]) -> None:
    seen: set[str] = set()
    for name in log.report_to:
        if name in seen:
            problems.append(f"log.report_to: {name} is listed twice")
            continue
        seen.add(name)
        missing = [m for m in TRACKER_MODULES.get(name, ()) if module_missing(m)]
        if missing:
            problems.append(f"log.report_to: {name} is not installed ({missing[0]} cannot be imported); install it "
                            f"with: pip install 'tunesmith[{name}]' (or leave {name} out of log.report_to)")
        elif name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and any(
                module_missing(m) for m in MLFLOW_LOCAL_STORE_MODULES):
            problems.append("log.report_to: mlflow's local store in the run folder needs the full mlflow package "
                            "(mlflow-skinny lacks its database support); install it with: pip install "
                            "'tunesmith[mlflow]', or set MLFLOW_TRACKING_URI to your tracking server")
    if not log.project:
        problems.append("log.project: must not be empty")


def _check_rl(cfg: Config, problems: list[str]) -> None:
    r = cfg.rl
    if not r.rewards and not r.reward_model:
        problems.append(f"rl.rewards / rl.reward_model: method {cfg.method} needs a reward; give reward functions "
                        "(e.g. rl.rewards=[exact_match]) and/or a reward model run (rl.reward_model=runs/reward)")
    if r.reward_weights is not None and len(r.reward_weights) != len(r.rewards):
        problems.append(f"rl.reward_weights: {len(r.reward_weights)} weights for {len(r.rewards)} rewards; give one per reward")
    for where, value in (("rl.group_size", r.group_size), ("rl.max_new_tokens", r.max_new_tokens),
                         ("rl.update_epochs", r.update_epochs), ("rl.micro_batch_size", r.micro_batch_size)):
        if isinstance(value, int) and value < 1:
            problems.append(f"{where}: must be at least 1, got {value}")
    if cfg.method == "grpo" and isinstance(r.group_size, int) and r.group_size < 2:
        problems.append(f"rl.group_size: GRPO compares completions of the same prompt, so it needs at least 2, got {r.group_size}")
    if r.minibatch_size is not None and r.minibatch_size < 1:
        problems.append(f"rl.minibatch_size: must be at least 1 (or null), got {r.minibatch_size}")
    if isinstance(r.temperature, float) and r.temperature <= 0:
        problems.append(f"rl.temperature: rollouts are sampled, so it must be above 0, got {r.temperature}")
    if isinstance(r.clip_eps, float) and not 0 < r.clip_eps < 1:
        problems.append(f"rl.clip_eps: must be in (0, 1), got {r.clip_eps}")
    if isinstance(r.kl_coef, float) and r.kl_coef < 0:
        problems.append(f"rl.kl_coef: must be 0 or more, got {r.kl_coef}")
    if cfg.method == "ppo":
        p = cfg.ppo
        for where, value in (("ppo.gamma", p.gamma), ("ppo.lam", p.lam)):
            if isinstance(value, float) and not 0 <= value <= 1:
                problems.append(f"{where}: must be in [0, 1], got {value}")
        if isinstance(p.value_clip, float) and p.value_clip <= 0:
            problems.append(f"ppo.value_clip: must be positive, got {p.value_clip}")
        if isinstance(p.vf_coef, float) and p.vf_coef < 0:
            problems.append(f"ppo.vf_coef: must be 0 or more, got {p.vf_coef}")
        if p.adaptive_kl:
            if isinstance(p.kl_target, float) and p.kl_target <= 0:
                problems.append(f"ppo.kl_target: must be positive, got {p.kl_target}")
            if isinstance(p.kl_horizon, int) and p.kl_horizon < 1:
                problems.append(f"ppo.kl_horizon: must be at least 1, got {p.kl_horizon}")
            if isinstance(r.kl_coef, float) and r.kl_coef == 0:
                problems.append("rl.kl_coef: the adaptive KL controller scales it, so it cannot start at 0; give a "
                                "starting coefficient (e.g. 0.05) or set ppo.adaptive_kl=false")
    if isinstance(r.max_new_tokens, int) and r.max_new_tokens >= cfg.train.max_length:
        problems.append(f"rl.max_new_tokens: {r.max_new_tokens} leaves no room for the prompt in "
                        f"train.max_length={cfg.train.max_length}; raise train.max_length")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into its key path and a YAML-parsed value."""
    if "=" not in item:
        raise TunesmithError(f"override {item!r}: expected key=value, for example train.lr=1e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise TunesmithError(f"override {item!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides to a plain config mapping."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise TunesmithError(f"config file {str(p)!r} not found; give the path of a YAML file (see configs/ for examples)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TunesmithError(f"config file {str(p)!r}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TunesmithError(f"config file {str(p)!r}: expected a mapping of keys at the top, got {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any]) -> Config:
    """Turn a plain mapping into a checked Config; all problems are raised together."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        _check(cfg, problems)
    if problems:
        raise TunesmithError(f"invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''}):", problems=problems)
    return cfg


def load_config(source: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> Config:
    """Load a Config from a YAML path, a mapping or a Config, then apply overrides."""
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = _deepcopy(source)
    else:
        raw = read_yaml(source)
    return build_config(apply_overrides(raw, list(overrides or [])))


def _deepcopy(raw: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(raw))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
