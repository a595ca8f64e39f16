"""One RL step, shared by GRPO and PPO: sample, score, measure, then update through the shared loop.

`RLObjective.train_step` is what the loop calls instead of its plain update for these methods:
  1. sample `rl.group_size` completions per prompt from the current policy (KV cache, seeded per
     step so a resumed run samples the same completions);
  2. score them with the reward functions and/or the reward model;
  3. measure, without gradients, the policy's and the reference's log-probs of every completion
     token (and the values, for PPO), and let the method turn rewards into advantages;
  4. make `rl.update_epochs` passes over the completions in minibatches, one optimizer update each,
     through the loop's `StepTools.update` (the objective's `forward` is the method's loss).
The reference is the policy with its LoRA adapters disabled, or a frozen copy under full fine-tuning.

Under torchrun each rank samples, scores and measures its own share of the step's prompts (the loop hands
it them), so a group's answers stay on one rank and each reward function sees each completion once. Every
answer samples from its own generator, seeded by (seed, step, its place in the step's global batch), so the
ranks draw the answers one process would. What spans the batch is gathered over ranks: PPO's whitening,
the minibatches (drawn over every rank's completions, each rank training on its members of one), the
logged means. The updates are data-parallel through the loop's DDP: the loss is normalised over every
rank's count, as one process normalises it. `tests/invariants/test_rl_ranks.py` checks 2 ranks = 1 rank.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.core.contract import Objective, StepOutcome, StepTools
from tunesmith.core.distributed import DistInfo, all_gather_objects, all_gather_tensors, all_reduce_sum
from tunesmith.core.logs import truncate_metrics
from tunesmith.core.next_token import labelled_states, token_owner
from tunesmith.model.attention import trees_fit
from tunesmith.model.generate import Generation, GenerationSettings, generate
from tunesmith.model.parts import decoder_and_head, frozen_copy, reference_model, unwrap
from tunesmith.ops.losses import chunked_token_logps, chunked_token_logps_entropy, shift_targets
from tunesmith.rollout.rewards import RewardSet, Scored
from tunesmith.rollout.sequences import Completion, PromptRow, collate_sequences, pack_sequences

SAMPLES = "samples.jsonl"


class RLObjective(Objective):
    """The loss module of an RL method: `train_step` runs a whole step; `forward` is the method's loss on a batch."""

    reports_perplexity = False

    def __init__(self, model: nn.Module, policy: nn.Module, cfg: Config, tokenizer) -> None:
        super().__init__()
        self.model = model  # what trains: the policy, or the policy plus a value head
        self.policy = policy  # the causal LM that samples (with its LoRA adapters, if any)
        self.cfg = cfg
        self.rl = cfg.rl
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._decoder, self._head = decoder_and_head(policy)
        self.rewards = RewardSet(cfg.rl.rewards, cfg.rl.reward_weights, cfg.rl.reward_model, cfg.rl.reward_model_weight)
        self.needs_reference = self.uses_reference()
        frozen = None
        if self.needs_reference and not hasattr(policy, "disable_adapter"):
            frozen = frozen_copy(policy)  # full fine-tuning: the weights at step 0
        self._frozen = [frozen] if frozen is not None else []  # out of the module tree: not trained or saved
        self._samples_checked = False
        # Completions of one prompt train as a tree holding the prompt once; the tree needs tunesmith's
        # per-document SDPA (model/attention.py) in every layer, which some models cannot give it.
        self.share_prompts = cfg.rl.share_prompts and trees_fit(unwrap(policy).config, cfg.train.max_length)

    # ---------------------------------------------------------------- what methods provide

    def uses_reference(self) -> bool:
        """Whether the method needs the reference log-probs."""
        return self.rl.kl_coef > 0

    def advantages(self, seqs: list[Completion], scored: Scored, group_size: int,
                   info: DistInfo | None = None) -> tuple[list[Completion], dict[str, float]]:
        """Fill each sequence's `advantages` (and whatever else the loss needs); return the ones to train on.

        `seqs` are this rank's; statistics over the whole batch are gathered over `info`'s ranks (`gathered`).
        Every sequence gets `advantages`, those not returned too (a rank without data trains one with weight 0)."""
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What one update's loss is averaged over."""
        raise NotImplementedError

    def measures_old_logps(self) -> bool:
        """Whether the rollout pass measures the policy's log-probs; without it the update uses its own, detached."""
        return True

    def measure_values(self, selected: torch.Tensor) -> torch.Tensor | None:
        """Values of the states that predict each completion token (PPO); None when the method has no critic."""
        return None

    # ---------------------------------------------------------------- the step

    def train_step(self, rows: list[PromptRow], *, step: int, tools: StepTools) -> StepOutcome:
        """Sample, score, measure and update for this rank's share of one step's prompts."""
        rl, run_dir, info = self.rl, tools.run_dir, tools.info
        group = rl.group_size
        if run_dir is not None and info.is_main and not self._samples_checked:
            truncate_metrics(run_dir / SAMPLES, step)  # a resumed run drops the samples of the steps it redoes
            self._samples_checked = True
        # this rank's first completion in the step's global batch (ranks hold consecutive shares, in rank order)
        first = sum(all_gather_objects(len(rows), info)[: info.rank]) * group
        clock = [time.perf_counter()]
        generations = self.sample(rows, group, seed=self.cfg.train.seed * 1_000_003 + step, first=first)
        clock.append(time.perf_counter())
        prompts = [r for r in rows for _ in range(group)]  # each prompt's completions side by side
        scored = self.score(prompts, generations)
        clock.append(time.perf_counter())
        seqs = [Completion(p.input_ids, g.token_ids, i) for i, (p, g) in enumerate(zip(prompts, generations))]
        measured = self.measure(seqs, info)
        train_seqs, method_stats = self.advantages(seqs, scored, group, info)
        clock.append(time.perf_counter())

        # The minibatches are drawn over the global batch's trained completions, by their global place.
        kept = torch.tensor([first + s.index for s in train_seqs], dtype=torch.long)
        everyone = torch.cat(all_gather_tensors(kept, info)).tolist()  # (kept,) in global order, as one process has them
        losses, grad_norms, update_stats, counted = [], [], [], 0.0
        if everyone:
            filler = self.collated(seqs[:1])[0][1] if info.enabled else None  # trained with weight 0 (StepTools.update)
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)
            size = rl.minibatch_size or len(everyone)
            for _ in range(rl.update_epochs):
                order = torch.randperm(len(everyone), generator=gen).tolist()
                for start in range(0, len(order), size):
                    # A minibatch is a random draw; within it, completions go in sampling order, so a prompt's
                    # answers share micro-batches and its tree (the loss is a sum: the order changes nothing else).
                    members = {everyone[i] for i in order[start : start + size]}
                    chosen = [s for s in train_seqs if first + s.index in members]
                    outcome = tools.update([batch for _, batch in self.collated(chosen)], filler=filler)
                    losses.append(outcome.loss)
                    grad_norms.append(outcome.grad_norm)
                    update_stats.append(outcome.stats)
                    counted += outcome.count
        num_completions = int(all_reduce_sum(torch.tensor([len(seqs)], dtype=torch.float64, device=info.device),
                                             info).item())
        self.after_step(measured, num_completions)
        clock.append(time.perf_counter())

        rewards = gathered(torch.tensor(scored.total, dtype=torch.float64), info)[0].tolist()
        parts = {name: gathered(torch.tensor(v, dtype=torch.float64), info)[0].tolist() for name, v in scored.parts.items()}
        lengths = gathered(torch.tensor([len(g.token_ids) for g in generations], dtype=torch.float64), info)[0].tolist()
        stats = {
            "reward": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            **{f"reward/{name}": statistics.fmean(values) for name, values in parts.items()},
            "completion_length": statistics.fmean(lengths),
            **{k: v for k, v in measured.items() if k in ("entropy", "kl")},
            **method_stats,
            "num_updates": float(len(losses)),
            # where the step's time went on this rank: sampling, rewards, log-probs/values, and the optimizer updates
            **{f"time/{name}_s": b - a for name, a, b in zip(("rollout", "reward", "measure", "update"), clock, clock[1:])},
        }
        for name in update_stats[0] if update_stats else []:
            stats[name] = statistics.fmean(s[name] for s in update_stats)
        if run_dir is not None and rl.samples_every and (step + 1) % rl.samples_every == 0:
            self.write_samples(run_dir, step + 1, prompts, generations, scored, info)
        tokens = torch.tensor([sum(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)], dtype=torch.float64,
                              device=info.device)
        return StepOutcome(loss=statistics.fmean(losses) if losses else None,
                           grad_norm=statistics.fmean(grad_norms) if grad_norms else 0.0, stats=stats,
                           tokens=int(all_reduce_sum(tokens, info).item()), count=counted)

    def after_step(self, measured: dict[str, float], num_completions: int) -> None:
        """Hook for state carried between steps (PPO's adaptive KL coefficient)."""

    def sample(self, rows: list[PromptRow], group: int, seed: int, *, greedy: bool = False,
               first: int = 0) -> list[Generation]:
        """Completions of every prompt, `group` each, from the current policy; the k-th samples from its own
        generator, seeded by `seed` and its place `first + k` in the step's global batch."""
        rl = self.rl
        settings = GenerationSettings(
            max_new_tokens=rl.max_new_tokens, temperature=0.0 if greedy else rl.temperature, top_p=rl.top_p,
            top_k=rl.top_k, stop=list(rl.stop), batch_size=max(16, rl.micro_batch_size), seed=seed,
        )
        conversations = [r.messages for r in rows for _ in range(group)]
        seeds = [(seed * 1_000_033 + first + k) % 2**63 for k in range(len(conversations))]
        return generate(self.policy, self.tokenizer, conversations, settings, desc="rollout", seeds=seeds)

    def score(self, prompts: list[PromptRow], generations: list[Generation]) -> Scored:
        """Rewards of each completion (every reward function, weighted, plus the reward model)."""
        names = sorted({k for p in prompts for k in p.fields})
        fields = {k: [p.fields.get(k) for p in prompts] for k in names}
        return self.rewards.score([p.prompt for p in prompts], [p.messages for p in prompts],
                                  [g.text for g in generations], fields)

    def collated(self, seqs: list[Completion]) -> list[tuple[list[Completion], dict[str, torch.Tensor]]]:
        """Completions in groups of rl.micro_batch_size, each packed into rows and collated (on the CPU)."""
        out = []
        for k in range(0, len(seqs), self.rl.micro_batch_size):
            chunk = seqs[k : k + self.rl.micro_batch_size]
            rows = pack_sequences(chunk, self.cfg.train.max_length, share_prompts=self.share_prompts)
            out.append((chunk, collate_sequences(rows, self.pad_id)))
        return out

    @torch.no_grad()
    def measure(self, seqs: list[Completion], info: DistInfo | None = None) -> dict[str, float]:
        """Old (rollout-time) and reference log-probs, values, and entropy of every completion token of this rank;
        the means it returns are over every rank's.

        With `measures_old_logps()` false only the reference is measured; entropy and KL then come from the update.
        """
        old_pass = self.measures_old_logps()
        if not old_pass and not self.needs_reference:
            return {}
        was_training = self.model.training
        self.model.eval()  # the same network as the update's forward, without dropout noise
        entropy_sum, kl_sum, num_tokens = 0.0, 0.0, 0
        try:
            for chunk, cpu_batch in self.collated(seqs):
                batch = {n: v.to(_device(self.policy)) for n, v in cpu_batch.items()}
                ref = self.reference_logps(batch) if self.needs_reference else None
                fields = {"ref_logps": ref}
                if old_pass:
                    selected, targets, _ = labelled_states(self._decoder, batch["input_ids"], batch["labels"],
                                                           batch["position_ids"])
                    logps, entropy = chunked_token_logps_entropy(selected, targets, self._head)
                    fields.update(old_logps=logps, old_values=self.measure_values(selected))
                    entropy_sum += float(entropy.sum())
                    num_tokens += int(logps.numel())
                    if ref is not None:
                        kl_sum += float(self.kl_estimate(logps, ref).sum())
                _store_per_completion(chunk, batch, fields)
        finally:
            self.model.train(was_training)
        if not old_pass:
            return {}
        info = info or DistInfo()
        sums = torch.tensor([entropy_sum, kl_sum, num_tokens, len(seqs)], dtype=torch.float64, device=info.device)
        entropy_sum, kl_sum, num_tokens, num_seqs = all_reduce_sum(sums, info).tolist()
        out = {"entropy": entropy_sum / max(num_tokens, 1)}
        if self.needs_reference:
            out["kl"] = kl_sum / max(num_tokens, 1)
            out["kl_per_completion"] = kl_sum / max(num_seqs, 1)
        return out

    def kl_estimate(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """The per-token KL estimate logged (and used by the method's penalty)."""
        from tunesmith.ops.rl import kl_k3

        return kl_k3(logps, ref_logps)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs of the labelled tokens under the reference: (tokens,)."""
        with reference_model(self.policy, self._frozen[0] if self._frozen else None) as (decoder, head):
            selected, targets, _ = labelled_states(decoder, batch["input_ids"], batch["labels"], batch["position_ids"])
            logps = chunked_token_logps(selected, targets, head)
        return logps

    # ---------------------------------------------------------------- eval and samples

    @torch.no_grad()
    def evaluate_rows(self, rows: list[PromptRow], *, step: int, tools: StepTools) -> dict[str, float]:
        """Mean reward of greedy completions of held-out prompts (each rank answers and scores its share)."""
        info = tools.info
        mine = rows[info.rank :: info.world_size]
        generations = self.sample(mine, 1, seed=0, greedy=True)
        scored = self.score(mine, generations)
        total = gathered(torch.tensor(scored.total, dtype=torch.float64), info)[0].tolist()
        out = {"eval_reward": statistics.fmean(total)}
        for name, values in scored.parts.items():
            out[f"eval_reward/{name}"] = statistics.fmean(
                gathered(torch.tensor(values, dtype=torch.float64), info)[0].tolist())
        return out

    def write_samples(self, run_dir: Path, step: int, prompts: list[PromptRow], generations: list[Generation],
                      scored: Scored, info: DistInfo | None = None) -> None:
        """Append this step's completions, with their rewards, to run_dir/samples.jsonl (every rank's, by rank 0)."""
        lines = []
        for i, (p, g) in enumerate(zip(prompts, generations)):
            parts = {k: v[i] for k, v in scored.parts.items()}
            lines.append(json.dumps({"step": step, "prompt": p.prompt, "completion": g.text, "reward": scored.total[i],
                                     "rewards": parts, "finish_reason": g.finish_reason}, ensure_ascii=False) + "\n")
        info = info or DistInfo()
        everyone = all_gather_objects(lines, info)
        if info.is_main:
            with (run_dir / SAMPLES).open("a", encoding="utf-8") as fh:
                fh.writelines(line for part in everyone for line in part)


def gathered(values: torch.Tensor, info: DistInfo | None) -> tuple[torch.Tensor, slice]:
    """Every rank's `values` (1-D) joined in rank order, as one process holds them, and where this rank's lie."""
    parts = all_gather_tensors(values, info or DistInfo())
    start = sum(p.numel() for p in parts[: (info.rank if info is not None else 0)])
    return torch.cat(parts), slice(start, start + values.numel())


def _store_per_completion(chunk: list[Completion], batch: dict[str, torch.Tensor],
                          fields: dict[str, torch.Tensor | None]) -> None:
    """Split per-token tensors (labelled-token order) back to the completions they belong to."""
    positions, _ = shift_targets(batch["labels"])
    index = batch["completion_index"][token_owner(batch["seq_index"], positions)]  # (tokens,) completion of each token
    for s in chunk:
        mine = (index == s.index).nonzero(as_tuple=True)[0]
        for name, values in fields.items():
            if values is not None:
                s.token_fields[name] = values[mine].tolist()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device

