"""The one training loop every method runs.

AdamW, linear warm-up then cosine decay, gradient clipping, gradient accumulation with the loss
normalised over everything counted in the global batch (tokens for next-token methods, pairs for
preference methods; across accumulation steps and ranks), periodic eval, atomic checkpoints with
exact resume, and logs. What it does on a stop signal, a NaN and running out of memory is in
`tunesmith.core.guards`.

What the loop calls on the module it trains is written down in `tunesmith.core.contract.Objective`.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tunesmith.config import TrainConfig
from tunesmith.core import checkpoint as ckpt
from tunesmith.core import fsdp, guards
from tunesmith.core.contract import Objective, StepOutcome
from tunesmith.core.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier
from tunesmith.core.logs import RunLogger, truncate_metrics
from tunesmith.core.trackers import Trackers
from tunesmith.data import Row, collate
from tunesmith.errors import TunesmithError
from tunesmith.ops.losses import perplexity

Collate = Callable[[list, int], dict[str, torch.Tensor]]


@dataclass
class LoopResult:
    """What the loop did, for the run summary."""

    steps: int
    total_steps: int
    resumed_from: int
    tokens_seen: int
    final_loss: float | None
    eval_loss: float | None
    wall_s: float
    peak_rss_mb: float
    history: list[dict] = field(default_factory=list)
    nonfinite_steps: int = 0  # steps skipped for a NaN or infinite loss or gradient norm


_ON_BAR = ("accuracy", "rewards/accuracy", "rewards/margin", "reward", "kl")  # shown on the progress bar when a method logs them
_ON_EVAL_LINE = ("eval_loss", "eval_ppl", "eval_reward", "eval_accuracy", "eval_margin", "eval_rewards/accuracy", "eval_rewards/margin")


def total_steps(num_rows: int, cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps the run makes: train.max_steps, else ceil(epochs * rows / global batch)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil(cfg.epochs * num_rows / global_batch))


class RowOrder:
    """Which rows each step uses: an endless stream of per-epoch permutations seeded by (seed, epoch).

    The order depends only on the seed, the row count and the global batch size, so runs with the
    same global batch split differently (micro-batches, accumulation, ranks) see the same rows, and a
    resumed run picks up exactly where it stopped.
    """

    def __init__(self, num_rows: int, global_batch: int, seed: int) -> None:
        self.num_rows = num_rows
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.num_rows, generator=gen).tolist()}
        return self._perms[epoch]

    def step_rows(self, step: int) -> list[int]:
        """Row indices of the global batch of `step`."""
        start = step * self.global_batch
        return [self._perm(p // self.num_rows)[p % self.num_rows] for p in range(start, start + self.global_batch)]

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached after `step` steps."""
        return step * self.global_batch / self.num_rows


def warmup_cosine(total: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to `min_lr_ratio`."""
    warmup = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


# Tokens per forward/backward pass when train.forward_tokens is null. On CPU, passes of 512 tokens run
# faster per token than 4096-token ones and hold an eighth of the activations (bench/RESULTS.md).
DEFAULT_FORWARD_TOKENS = {"cpu": 512, "cuda": 16384}


def forward_groups(rows: list[Row], limit: int | None) -> list[list[Row]]:
    """Consecutive groups of `rows` that each fit `limit` padded tokens (rows x longest row); a row longer
    than `limit` goes alone. Losses are normalised over the whole update, so the split changes no maths."""
    if not limit:
        return [rows] if rows else []
    groups: list[list[Row]] = []
    current: list[Row] = []
    width = 0
    for row in rows:
        wider = max(width, len(row.input_ids))
        if current and wider * (len(current) + 1) > limit:
            groups.append(current)
            current, wider = [], len(row.input_ids)
        current.append(row)
        width = wider
    if current:
        groups.append(current)
    return groups


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sum_stats(total: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, value in stats.items():
        if name not in total:
            total[name] = torch.zeros((), dtype=torch.float64, device=device)
        total[name] += value.detach().double()


def _reduce_stats(total: dict[str, torch.Tensor], count: float, info: DistInfo) -> dict[str, float]:
    """Means over the global batch of summed statistics.

    Every rank takes part in the same collectives even when its share was empty (an eval shard smaller
    than the number of ranks): the names are agreed first, and a rank without a statistic adds zero.
    """
    names = sorted({n for part in all_gather_objects(sorted(total), info) for n in part})
    if not names:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=info.device)
    stacked = torch.stack([total.get(k, zero) for k in names])
    all_reduce_sum(stacked, info)
    return {k: v / count for k, v in zip(names, stacked.tolist())}


@torch.no_grad()
def evaluate(
    loss_module: Objective, rows: list[Row], batch_size: int, pad_id: int, info: DistInfo, collate_fn: Collate = collate,
    *, lockstep: bool = False,
) -> dict[str, float]:
    """Mean loss per counted item (and perplexity, for next-token losses) over `rows`, sharded across ranks.

    With `lockstep` (an FSDP model, whose every forward gathers on all ranks) each rank runs as many batches as the
    rank with the most, repeating its first batch (or the first row) without counting it."""
    was_training = loss_module.training
    loss_module.eval()
    mine = rows[info.rank :: info.world_size]
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    count = torch.zeros((), dtype=torch.float64, device=info.device)
    totals: dict[str, torch.Tensor] = {}
    starts = list(range(0, len(mine), batch_size))
    extra = fsdp.passes_to_match(len(starts), info) - len(starts) if lockstep and rows else 0
    for i in starts:
        batch = _to_device(collate_fn(mine[i : i + batch_size], pad_id), info.device)
        s, n, stats = loss_module(**batch)
        loss_sum += s.double()
        count += n.double()
        _sum_stats(totals, stats, info.device)
    for _ in range(extra):
        loss_module(**_to_device(collate_fn((mine or rows)[:batch_size], pad_id), info.device))
    all_reduce_sum(loss_sum, info)
    all_reduce_sum(count, info)
    loss_module.train(was_training)
    total = max(count.item(), 1.0)
    mean = loss_sum.item() / total
    result = {"eval_loss": mean}
    if loss_module.reports_perplexity:
        result["eval_ppl"] = perplexity(mean)
    result.update({f"eval_{k}": v for k, v in _reduce_stats(totals, total, info).items()})
    return result



class LoopCallback:
    """Watches the loop from outside (benchmarks, tests, trackers); every hook does nothing unless overridden."""

    def on_train_begin(self, model: nn.Module, step: int) -> None:
        """Called once before the first step (`step` > 0 on a resumed run)."""

    def on_step_end(self, step: int, outcome: StepOutcome) -> None:
        """Called after step `step` (counted from 1) is logged, evaluated and checkpointed."""

    def on_train_end(self, model: nn.Module, result: LoopResult) -> None:
        """Called once after the last step, before any output is written."""


class Updater:
    """The loop's `StepTools`: optimizer updates from micro-batches or rows, and the eval loss.

    An update normalises the loss over everything the objective counts in all its micro-batches (and on
    every rank), clips gradients and steps AdamW; when the loss or the gradient norm is NaN or infinite it skips
    the step (no update) and counts it in `skipped`. The scheduler is the loop's.
    """

    def __init__(self, ddp_module: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                 trainable: list[nn.Parameter], cfg: TrainConfig, info: DistInfo, pad_id: int, collate_fn: Collate,
                 run_dir: Path | None) -> None:
        self.ddp_module = ddp_module
        self.objective = objective
        self.optimizer = optimizer
        self.trainable = trainable
        self.cfg = cfg
        self.info = info
        self.pad_id = pad_id
        self.collate_fn = collate_fn
        self.run_dir = run_dir
        self.forward_tokens = cfg.forward_tokens or DEFAULT_FORWARD_TOKENS.get(info.device.type)
        self.skipped = 0  # updates skipped for a non-finite loss or gradient norm
        self.sharded = fsdp.is_sharded(objective)

    def update(self, micro: list[dict[str, torch.Tensor]], *,
               filler: dict[str, torch.Tensor] | None = None) -> StepOutcome:
        """Forward and backward every micro-batch, then clip and step; returns the update's loss and statistics.
        `filler` (see `StepTools.update`) runs with its loss times zero when this rank has no micro-batch."""
        info = self.info
        count = torch.tensor([sum(self.objective.count(mb) for mb in micro)], dtype=torch.float64, device=info.device)
        all_reduce_sum(count, info)
        global_count = max(count.item(), 1.0)
        loss_acc = torch.zeros((), dtype=torch.float64, device=info.device)
        totals: dict[str, torch.Tensor] = {}
        if not micro and info.enabled and filler is not None and not self.sharded:
            # DDP all-reduces gradients in every rank's backward: a rank without data still takes part, adding zero
            loss_sum, _, _ = self.ddp_module(**_to_device(filler, info.device))
            (loss_sum * 0.0).backward()
        # FSDP gathers every layer in every pass, so each rank runs as many passes as the rank with the most: the
        # extra ones repeat this rank's last micro-batch with a zero weight (FSDP reduce-scatters each pass's
        # gradients, so no pass waits for the last to synchronise as DDP's no_sync does)
        passes = fsdp.passes_to_match(len(micro), info) if self.sharded else len(micro)
        for i in range(passes):
            last, repeat = i == len(micro) - 1, i >= len(micro)
            sync = nullcontext() if (last or repeat or self.sharded or not info.enabled) else self.ddp_module.no_sync()
            with sync:
                loss_sum, _, stats = self.ddp_module(**_to_device(micro[min(i, len(micro) - 1)], info.device))
                # DDP and FSDP average gradients over ranks; scaling by world_size turns that into a sum,
                # so the step's gradient is (sum of item losses) / (items of the global batch).
                (loss_sum * ((0.0 if repeat else info.world_size) / global_count)).backward()
            if repeat:
                continue
            loss_acc += loss_sum.detach().double()
            _sum_stats(totals, stats, info.device)
        # without clipping, an infinite bound measures the norm and leaves the gradients as they are
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        if self.sharded:
            grad_norm = fsdp.clip_grad_norm(self.trainable, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        all_reduce_sum(loss_acc, info)
        if guards.finite(loss_acc.item()) and guards.finite(float(grad_norm)):
            self.optimizer.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss=loss_acc.item() / global_count, grad_norm=float(grad_norm),
                           stats=_reduce_stats(totals, global_count, info), count=count.item())

    def update_rows(self, rows: list[Row]) -> StepOutcome:
        """One update from this rank's rows of the step: batch_size rows per accumulation step, each split into
        forward passes of at most `forward_tokens` padded tokens; the outcome counts the step's tokens."""
        size = self.cfg.batch_size
        micro = [
            self.collate_fn(group, self.pad_id)
            for i in range(0, len(rows), size)
            for group in forward_groups(rows[i : i + size], self.forward_tokens)
        ]
        outcome = self.update(micro)
        tokens = torch.tensor([sum(len(r.input_ids) for r in rows)], dtype=torch.float64, device=self.info.device)
        all_reduce_sum(tokens, self.info)
        outcome.tokens = int(tokens.item())
        return outcome

    def eval_loss(self, rows: list[Row]) -> dict[str, float]:
        """Mean loss per counted item over `rows` (see `evaluate`)."""
        # the objective itself, not its DDP wrapper: DDP's forward syncs buffers with the other ranks,
        # and ranks whose eval shards hold different numbers of batches would wait on each other (under FSDP the
        # objective gathers its layers in every forward, so the ranks run the same number of batches)
        return evaluate(self.objective, rows, self.cfg.batch_size, self.pad_id, self.info, self.collate_fn,
                        lockstep=self.sharded)


def train_loop(
    *,
    model: nn.Module,
    loss_module: Objective,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    cfg: TrainConfig,
    run_dir: Path | None,
    info: DistInfo,
    pad_id: int,
    collate_fn: Collate = collate,
    callbacks: Sequence[LoopCallback] = (),
    trackers: Trackers | None = None,
) -> LoopResult:
    """Train `model` through `loss_module` on `train_rows`; resume from run_dir/checkpoints if present.
    Metrics go to run_dir/metrics.jsonl and to `trackers` (started by the caller), at the same steps."""
    started = time.time()
    steps = total_steps(len(train_rows), cfg, info.world_size)
    sharded_checkpoints = cfg.distributed == "fsdp"  # on one rank too, so that a run can resume on another number
    if sharded_checkpoints and info.enabled:
        fsdp.shard(loss_module, info)  # before the optimizer: it steps the sharded parameters
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    ddp_module: nn.Module = loss_module
    if info.enabled and not sharded_checkpoints:
        ddp_module = DistributedDataParallel(
            loss_module, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )

    state = ckpt.TrainerState()
    ckpt_root = run_dir / "checkpoints" if run_dir is not None else None
    damaged_note = ""
    if ckpt_root is not None:
        if info.is_main:
            ckpt.clean_partial(ckpt_root)
        good, damaged = ckpt.find_resumable(ckpt_root)
        if good is None and damaged:
            raise ckpt.no_good_checkpoint(ckpt_root, damaged)
        if good is not None:
            state = ckpt.load_checkpoint(good, model, optimizer, scheduler, info)
            if info.is_main:
                truncate_metrics(run_dir / "metrics.jsonl", state.step)
            saved_world = ckpt.world_size_of(good)
            if saved_world not in (None, info.world_size):
                damaged_note += (f"checkpoint {good} was written by {saved_world} ranks and resumes on "
                                 f"{info.world_size}\n")
        if damaged:
            barrier(info)  # every rank has chosen its checkpoint before the damaged ones move
            if info.is_main:
                damaged_note += "".join(f"checkpoint {d} is damaged ({why}); set aside as {ckpt.set_aside(d)}\n"
                                       for d, why in damaged) + f"resuming from the previous good one, {good}"
    resumed_from = state.step

    logger = RunLogger(run_dir, steps, state.step, enabled=info.is_main, trackers=trackers)
    if damaged_note:
        logger.write(damaged_note.rstrip("\n"))
    if resumed_from:
        logger.write(f"resumed from checkpoint at step {resumed_from}")
    order = RowOrder(len(train_rows), cfg.batch_size * cfg.grad_accum * info.world_size, cfg.seed)
    per_rank = cfg.batch_size * cfg.grad_accum
    trainable = [p for p in model.parameters() if p.requires_grad]
    tools = Updater(ddp_module, loss_module, optimizer, trainable, cfg, info, pad_id, collate_fn, run_dir)
    loss_module.load_method_state(state.method)
    history: list[dict] = []
    final_loss: float | None = None
    eval_loss: float | None = None
    window_tokens, window_start, shown = 0, time.time(), state.step
    stop, timer, nonfinite = guards.StopSignals(), guards.CheckpointTimer(cfg.save_every_minutes), guards.NonFiniteSteps(
        cfg.max_nonfinite_steps, state.nonfinite_steps)
    running = ""
    ddp_module.train()
    for callback in callbacks:
        callback.on_train_begin(model, state.step)

    stop.install()
    try:
        while state.step < steps:
            rows = order.step_rows(state.step)
            mine = [train_rows[i] for i in rows[info.rank * per_rank : (info.rank + 1) * per_rank]]
            running, skipped = f"step {state.step + 1}", tools.skipped
            outcome = loss_module.train_step(mine, step=state.step, tools=tools)
            with warnings.catch_warnings():  # a skipped first update is no misuse of the scheduler
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            state.step += 1
            state.tokens_seen += outcome.tokens
            window_tokens += outcome.tokens
            final_loss = outcome.loss
            grad_norm, step_stats = outcome.grad_norm, outcome.stats
            nonfinite.record(tools.skipped > skipped or not guards.finite(outcome.loss))
            state.nonfinite_steps = nonfinite.total

            if state.step % cfg.log_every == 0 or state.step == steps:
                elapsed = max(time.time() - window_start, 1e-9)
                tps = window_tokens / elapsed
                metrics = {
                    "loss": final_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tps,
                    "tokens_seen": state.tokens_seen,
                    "epoch": order.epoch_of(state.step),
                    **({"nonfinite_steps": nonfinite.total} if nonfinite.total else {}),
                    **step_stats,
                }
                history.append({"step": state.step, **metrics})
                logger.log(state.step, metrics)
                shown_stats = {k.rsplit("/", 1)[-1][:3]: f"{v:.2f}" for k, v in step_stats.items() if k in _ON_BAR}
                loss_text = f"{final_loss:.4f}" if final_loss is not None else "-"
                logger.progress(state.step - shown, {"loss": loss_text, **shown_stats, "tok/s": f"{tps:,.0f}"})
                window_tokens, window_start, shown = 0, time.time(), state.step
            if nonfinite.in_a_row:
                logger.write(f"step {state.step}: loss {final_loss}, gradient norm {grad_norm}: not finite, the update "
                             f"is skipped ({nonfinite.in_a_row} in a row, {nonfinite.total} in all)")
                if nonfinite.must_stop(state.step):
                    last = ckpt.find_resumable(ckpt_root)[0] if ckpt_root is not None else None
                    raise nonfinite.error(state.step, final_loss, grad_norm, cfg, next(model.parameters()).dtype, last)

            running = f"the eval after step {state.step}"
            if eval_rows and ((cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == steps):
                ev = loss_module.evaluate_rows(eval_rows, step=state.step, tools=tools)
                eval_loss = ev.get("eval_loss", eval_loss)
                history.append({"step": state.step, **ev})
                logger.log(state.step, ev)
                logger.write(f"step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items() if k in _ON_EVAL_LINE))

            running = f"the checkpoint of step {state.step}"
            by_steps = bool(cfg.save_every) and state.step % cfg.save_every == 0
            stopping, due = guards.agree([stop.signum is not None, by_steps or timer.due()], info)
            saved = None
            if ckpt_root is not None and ((due and state.step < steps) or stopping):
                state.method = loss_module.method_state()
                saved = ckpt.save_checkpoint(ckpt_root, model, optimizer, scheduler, state, info, cfg.keep_checkpoints,
                                             sharded=sharded_checkpoints)
                timer.reset()
            for callback in callbacks:
                callback.on_step_end(state.step, outcome)
            if stopping:
                raise guards.stopped(stop.signum or signal.SIGTERM, state.step, steps, saved, run_dir, info)
    except guards.OUT_OF_MEMORY as exc:
        raise guards.out_of_memory(exc, running, cfg, tools.forward_tokens, info) from None
    finally:
        stop.restore()
        logger.close()

    bad = (fsdp.nonfinite_shards(model, info) if tools.sharded
           else ckpt.nonfinite_weights({n: p for n, p in model.named_parameters() if p.requires_grad}))
    if bad:  # never reached through a skipped update; outputs must not carry it either way
        raise TunesmithError(f"after step {state.step}: weights {', '.join(bad[:3])} hold NaN or infinite values; "
                             "no outputs are written")
    result = LoopResult(
        steps=state.step,
        total_steps=steps,
        resumed_from=resumed_from,
        tokens_seen=state.tokens_seen,
        final_loss=final_loss,
        eval_loss=eval_loss,
        wall_s=time.time() - started,
        peak_rss_mb=peak_rss_mb(),
        history=history,
        nonfinite_steps=nonfinite.total,
    )
    for callback in callbacks:
        callback.on_train_end(model, result)
    return result
