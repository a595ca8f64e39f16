"""One run from config to outputs: validate everything, load, train, save, summarise.

Every check that can fail on user input (config, model path, data) runs before the output
folder is created, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.config import Config, load_config, save_config
from tunesmith.core import checkpoint as ckpt
from tunesmith.core import distributed, fsdp
from tunesmith.core.loop import LoopCallback, LoopResult, train_loop
from tunesmith.core.trackers import Trackers
from tunesmith.data import DataStats
from tunesmith.errors import TunesmithError
from tunesmith.eval import in_run
from tunesmith.eval.results import RESULTS_FILE, headline_numbers
from tunesmith.methods import get_method
from tunesmith.model import apply_lora, count_parameters, load_model, load_tokenizer, resolve_model
from tunesmith.model.attention import checkpoint_context
from tunesmith.model.export import write_file
from tunesmith.model.lock import LOCK_FILE, RunLock, holder, in_use

SUMMARY = "summary.json"
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run wrote, and how it went."""

    run_dir: Path
    outputs: dict[str, str]
    loop: LoopResult
    train_stats: DataStats
    eval_stats: DataStats | None = None
    parameters: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a user of the outputs must know, said once at the end

    def summary(self) -> dict[str, Any]:
        """Plain-data summary, as saved in summary.json."""
        return {
            "run_dir": str(self.run_dir),
            "outputs": self.outputs,
            "steps": self.loop.steps,
            "resumed_from": self.loop.resumed_from,
            "tokens_seen": self.loop.tokens_seen,
            "final_loss": self.loop.final_loss,
            "eval_loss": self.loop.eval_loss,
            "wall_s": round(self.loop.wall_s, 2),
            "peak_rss_mb": round(self.loop.peak_rss_mb, 1),
            "nonfinite_steps": self.loop.nonfinite_steps,
            "parameters": self.parameters,
            "train_data": asdict(self.train_stats),
            "eval_data": asdict(self.eval_stats) if self.eval_stats else None,
            "notes": self.notes,
        }


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Settings a resumed run may change: they decide memory use, how often things are written, and where the run
# lives, never the maths of a step (gradient checkpointing recomputes the same activations; forward_tokens and
# micro_batch_size split a batch into passes with the same sums). Anything else makes a different run.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "train.forward_tokens", "train.gradient_checkpointing", "train.save_every",
    "train.save_every_minutes", "train.keep_checkpoints", "train.log_every", "rl.micro_batch_size",
})
# Of those, the ones that draw dropout masks per pass: the run goes on correctly, but not bit for bit as it would have
PASS_SPLITS = frozenset({"train.forward_tokens", "rl.micro_batch_size"})


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, where + ".")
        elif a != b:
            diffs.append((where, f"{where}: checkpoint has {a!r}, now {b!r}"))
    return diffs


# How a global batch is split: these may change on resume (another number of ranks) when the global batch stays
SPLIT_KEYS = ("batch_size", "grad_accum", "forward_tokens")


def _same_global_batch(old: dict[str, Any], new: dict[str, Any], old_world: int | None, world_size: int) -> bool:
    """True when the split of the global batch changed but not its size: rows per step and the step count stay."""
    o, n = old.get("train") or {}, new.get("train") or {}
    if old_world is None or not all(isinstance(o.get(k), int) for k in ("batch_size", "grad_accum")):
        return False
    return o["batch_size"] * o["grad_accum"] * old_world == n["batch_size"] * n["grad_accum"] * world_size


def check_run_dir(cfg: Config, world_size: int = 1) -> bool:
    """Decide whether output_dir is new, resumable, or unusable; returns True when resuming.

    A run may resume on another number of ranks (`world_size` now) when train.batch_size x train.grad_accum x
    ranks is the global batch it had."""
    run_dir = Path(cfg.output_dir)
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise TunesmithError(f"output_dir {str(run_dir)!r} is a file; give a folder path")
    pid = holder(run_dir)
    if pid is not None:
        raise in_use(run_dir, pid)
    if (run_dir / SUMMARY).exists():
        raise TunesmithError(
            f"output_dir {str(run_dir)!r} holds a finished run ({SUMMARY} is there); "
            "choose a new output_dir, or delete that folder to train again"
        )
    saved = run_dir / "config.yaml"
    if not saved.exists():
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise TunesmithError(
                f"output_dir {str(run_dir)!r} is not empty and holds no tunesmith run; choose a new or empty folder"
            )
        return False
    good, damaged = ckpt.find_resumable(run_dir / "checkpoints")
    if good is None and damaged:
        raise ckpt.no_good_checkpoint(run_dir / "checkpoints", damaged)
    if good is None:
        return False  # stopped before its first checkpoint: start afresh in the same folder
    import yaml

    # output_dir may differ: a run folder that was moved or copied resumes where it now is; so may the
    # trackers (`log`), which change nothing in training (one added on resume gets the whole run replayed), and
    # the memory and bookkeeping settings of RESUME_MAY_CHANGE
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = cfg.to_dict()
    for section in (old, new):
        section.pop("log", None)
    old.setdefault("train", {}).setdefault("distributed", "ddp")  # runs from before the setting trained with ddp
    old_world = ckpt.world_size_of(good)
    same_batch = _same_global_batch(old, new, old_world, world_size)
    if same_batch:
        for section in (old, new):
            for key in SPLIT_KEYS:
                section["train"].pop(key, None)
    diffs = [text for key, text in _config_diff(old, new) if key not in RESUME_MAY_CHANGE]
    if old_world is not None and old_world != world_size and not same_batch:
        diffs.append(f"ranks: the checkpoint was written by {old_world}, now {world_size}; on another number of "
                     "ranks keep the global batch (train.batch_size x train.grad_accum x ranks) the same")
    if diffs:
        raise TunesmithError(
            f"output_dir {str(run_dir)!r} has a checkpoint from a different config; resuming needs the same "
            "settings (use a new output_dir to train with new ones; only memory and bookkeeping settings may "
            f"change: {', '.join(sorted(RESUME_MAY_CHANGE - {'output_dir'}))}):",
            problems=diffs,
        )
    return True


def changed_on_resume(cfg: Config) -> list[str]:
    """The memory and bookkeeping settings a resumed run changes, each as a line for the user."""
    import yaml

    saved = yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
    lines = []
    for key, text in _config_diff(saved, cfg.to_dict()):
        if key in RESUME_MAY_CHANGE - {"output_dir"}:
            note = ("; dropout masks are drawn per pass, so the run goes on correctly but no longer bit for bit as "
                    "it would have" if key in PASS_SPLITS and cfg.lora and cfg.lora.dropout > 0 else "")
            lines.append(f"resuming with a changed setting, {text}{note}")
    return lines


def train(source: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None, *,
          callbacks: Sequence[LoopCallback] = ()) -> RunResult:
    """Run one fine-tuning job; see `tunesmith.config.Config` for every field. `callbacks` watch the loop."""
    cfg = load_config(source, overrides)
    info = distributed.setup()
    try:
        with RunLock(cfg.output_dir) as lock:
            return _train(cfg, info, callbacks, lock)
    finally:
        distributed.teardown(info)


def _train(cfg: Config, info: distributed.DistInfo, callbacks: Sequence[LoopCallback], lock: RunLock) -> RunResult:
    method = get_method(cfg.method)
    resuming = check_run_dir(cfg, info.world_size)

    # Rank 0 imports a .gguf into the cache first, so the other ranks find it done.
    if info.is_main:
        resolved = resolve_model(cfg.model, cfg.load)
    distributed.barrier(info)
    if not info.is_main:
        resolved = resolve_model(cfg.model, cfg.load)
    tokenizer = load_tokenizer(resolved, cfg.load)
    assert cfg.data.train is not None  # checked by the config
    train_data = method.build_data(cfg, tokenizer, cfg.data.train)
    eval_data = method.build_data(cfg, tokenizer, cfg.data.eval) if cfg.data.eval else None
    run_eval = in_run.plan(cfg) if method.GENERATES else None
    if not method.GENERATES and cfg.data.test:
        log.warning("data.test is ignored for method %s: it trains a model that scores answers, not one that "
                    "writes them; put held-out pairs in data.eval for its accuracy", cfg.method)

    seed_everything(cfg.train.seed)
    model = load_model(resolved, cfg.load, device=info.device)
    if cfg.train.gradient_checkpointing:
        # the recomputation in backward must see the packed rows' per-document layout, as the forward did
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context})
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    lm = model
    model = method.wrap_model(model, cfg)
    trainable, total = count_parameters(model)

    run_dir = Path(cfg.output_dir)
    # only rank 0 logs: the other ranks have no trackers
    trackers = Trackers(cfg.log.report_to if info.is_main else [], project=cfg.log.project,
                        run_name=cfg.log.run_name or run_dir.resolve().name)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # one train per folder: refuses a live one, takes over a killed one's
        resuming = check_run_dir(cfg, info.world_size)  # again: no other train can change the folder from here on
        for line in changed_on_resume(cfg) if resuming else []:
            print(line, file=sys.stderr)
        save_config(cfg, run_dir / "config.yaml")
        if not resuming:
            (run_dir / "metrics.jsonl").write_text("")
        print(
            f"tunesmith {cfg.method}: {resolved.spec} ({_adapter_words(cfg)}; "
            f"{trainable:,} of {total:,} parameters trained) on {info.world_size} x {info.device.type}\n"
            f"  train: {train_data.stats.summary()}"
            + (f"\n  eval:  {eval_data.stats.summary()}" if eval_data else ""),
            flush=True,
        )
        trackers.start(cfg.to_dict(), run_dir, resuming)
    try:
        base_result = None
        if run_eval is not None and info.is_main:
            base_result = in_run.evaluate_base(lm, tokenizer, run_eval, run_dir, resolved.spec)
        distributed.barrier(info)

        loss_module = method.loss_module(model, cfg, tokenizer)
        for data in (train_data, eval_data):
            if data is not None:
                method.prepare(loss_module, data, cfg, info)
        loop = train_loop(
            model=model,
            loss_module=loss_module,
            train_rows=train_data.rows,
            eval_rows=eval_data.rows if eval_data else None,
            cfg=cfg.train,
            run_dir=run_dir,
            info=info,
            pad_id=tokenizer.pad_token_id,
            collate_fn=method.collate,
            callbacks=callbacks,
            trackers=trackers,
        )

        if fsdp.is_sharded(loss_module):
            del loss_module
            model, lm = _gather_model(model, cfg, resolved, method, info)
        outputs: dict[str, str] = {}
        if info.is_main:
            model.eval()
            outputs.update(method.save_outputs(model, tokenizer, cfg, run_dir))
            if run_eval is not None and base_result is not None:
                report, headline = in_run.evaluate_tuned_and_report(lm, tokenizer, run_eval, run_dir, base_result)
                outputs["report"] = str(report)
                print(headline, flush=True)
            if cfg.output.gguf is not None:
                outputs.update(_export_gguf(cfg, run_dir))
        distributed.barrier(info)
    except BaseException:
        trackers.close()  # their runs end as failed; a resumed run continues them
        raise

    result = RunResult(
        run_dir=run_dir,
        outputs=outputs,
        loop=loop,
        train_stats=train_data.stats,
        eval_stats=eval_data.stats if eval_data else None,
        parameters={"trainable": trainable, "total": total},
        notes=output_notes(cfg, lm, outputs),
    )
    if info.is_main:
        outputs["metrics"] = str(run_dir / "metrics.jsonl")
        outputs.update(trackers.locations)
        write_file(run_dir / SUMMARY, json.dumps(result.summary(), indent=2), "the run summary")
        # after summary.json: the run is complete whatever a tracker does with its end
        artifacts = [run_dir / SUMMARY]
        if "report" in outputs:
            artifacts += [Path(outputs["report"]), Path(outputs["report"]).parent / RESULTS_FILE]
        trackers.finish(tracker_summary(result), artifacts)
        print(format_summary(result), flush=True)
    return result


def _adapter_words(cfg: Config) -> str:
    """How the run trains, for its first line: 'full', or e.g. 'DoRA r=16 on an nf4 base'."""
    if cfg.lora is None:
        return "full"
    words = f"{'DoRA' if cfg.lora.use_dora else 'LoRA'} r={cfg.lora.r}{' rsLoRA' if cfg.lora.use_rslora else ''}"
    return words + (f" on an {cfg.load.quantize} base" if cfg.load.quantize else "")


def output_notes(cfg: Config, model: torch.nn.Module, outputs: dict[str, str]) -> list[str]:
    """What the outputs of this run are that their names do not say (a quantized base saved de-quantized)."""
    if cfg.load.quantize is None:
        return []
    dtype = str(model.get_base_model().dtype if hasattr(model, "get_base_model") else model.dtype).removeprefix("torch.")
    notes = [f"trained on a base quantized to {cfg.load.quantize} (load.quantize); the adapter was learnt against "
             f"those {cfg.load.quantize} weights"]
    for key in ("merged", "reward_model"):
        if key in outputs:
            notes.append(f"{key}/ holds the base de-quantized from {cfg.load.quantize} to {dtype} with the adapter "
                         "folded in: a plain model (no quantization config) that computes what the quantized run's "
                         "model did, not the original full-precision base plus the adapter")
    if "adapter" in outputs:
        notes.append(f"adapter/ on the original full-precision base differs slightly from the run's model; load the "
                     f"base with load.quantize={cfg.load.quantize} (or use merged/) to reproduce it")
    return notes


def _gather_model(sharded: torch.nn.Module, cfg: Config, resolved, method, info: distributed.DistInfo
                  ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The trained weights of an FSDP run gathered whole into a plain copy of the model on rank 0, for the outputs
    and the report; (model, its language model), the sharded ones on the other ranks."""
    whole = lm = None
    if info.is_main:
        print("gathering the sharded weights on rank 0 ...", flush=True)
        whole = load_model(resolved, cfg.load, device=info.device)
        if cfg.lora is not None:
            whole = apply_lora(whole, cfg.lora)
        lm = whole
        whole = method.wrap_model(whole, cfg)
    fsdp.gather_into(sharded, whole)
    if whole is None or lm is None:
        return sharded, sharded
    return whole, lm


def tracker_summary(result: RunResult) -> dict[str, float]:
    """The numbers the trackers get at the end: summary.json's as `summary/...` and the report's headline
    numbers as `report/<model>/<measure>` (and `report/<model>/<measure>_delta` against the base)."""
    numbers: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[prefix] = float(value)

    summary = result.summary()
    for key in ("steps", "resumed_from", "tokens_seen", "final_loss", "eval_loss", "wall_s", "peak_rss_mb",
                "parameters", "train_data", "eval_data"):
        walk(f"summary/{key}", summary.get(key))
    if "report" in result.outputs:
        results = Path(result.outputs["report"]).parent / RESULTS_FILE
        numbers.update(headline_numbers(json.loads(results.read_text(encoding="utf-8"))))
    return numbers


def _export_gguf(cfg: Config, run_dir: Path) -> dict[str, str]:
    """The run's model as GGUF (output.gguf), checked against it on the run's held-out rows."""
    from tunesmith.model.gguf_export import export

    quant = cfg.output.gguf
    assert quant is not None
    print(f"exporting to GGUF ({quant}) ...", flush=True)
    report = export(str(run_dir), gguf=run_dir / "gguf" / f"model.{quant}.gguf", quant=quant, load=cfg.load)
    print(report.summary(), flush=True)
    written = {"gguf": str(report.gguf)}
    if report.modelfile is not None:
        written["modelfile"] = str(report.modelfile)
    return written


def format_summary(result: RunResult) -> str:
    """The short closing summary: what was trained, how it went, what was written where."""
    loop = result.loop
    lines = [
        f"done: {loop.steps} steps"
        + (f" (resumed at {loop.resumed_from})" if loop.resumed_from else "")
        + f", {loop.tokens_seen:,} tokens in {loop.wall_s:.1f} s, peak memory {loop.peak_rss_mb:,.0f} MiB",
    ]
    if loop.final_loss is not None:
        lines.append(f"  final train loss {loop.final_loss:.4f}")
    if loop.eval_loss is not None:
        lines.append(f"  final eval loss  {loop.eval_loss:.4f}")
    if result.train_stats.num_truncated or result.train_stats.num_dropped:
        lines.append(
            f"  over-long samples: {result.train_stats.num_truncated} truncated, {result.train_stats.num_dropped} dropped"
        )
    lines += [f"  note: {note}" for note in result.notes]
    lines.append("wrote:")
    width = max(len(k) for k in result.outputs) if result.outputs else 0
    for key, path in result.outputs.items():
        lines.append(f"  {key:<{width}}  {path}")
    lines.append(f"  {'summary':<{width}}  {result.run_dir / SUMMARY}")
    return "\n".join(lines)
