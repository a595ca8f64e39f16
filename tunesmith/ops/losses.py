"""Language-model losses computed from hidden states, never from the full logits tensor."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PERPLEXITY_CAP = 50.0  # mean NLL beyond which perplexity is reported as exp(50): the model is lost either way


def perplexity(mean_nll: float) -> float:
    """exp(mean token negative log-likelihood), capped at exp(PERPLEXITY_CAP) so it never overflows."""
    return math.exp(min(mean_nll, PERPLEXITY_CAP))

IGNORE_INDEX = -100


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is counted, and those next tokens.

    Hidden state t predicts token t+1. Returns `(positions, targets)` where positions index the
    flattened `(batch * seq)` hidden states and targets are the token ids they must predict.
    """
    batch, seq = labels.shape
    next_labels = torch.full_like(labels, IGNORE_INDEX)  # (batch, seq)
    next_labels[:, :-1] = labels[:, 1:]
    flat = next_labels.reshape(-1)  # (batch * seq,)
    positions = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return positions, flat[positions]


def _head_logits(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """float32 logits of a chunk (float32 for a stable log-softmax under bf16), computed for a plain linear head
    exactly as the fused functions compute them, so every path gives bit-identical log-probs."""
    weight = linear_weight(head)
    return (hidden @ weight.t()).float() if weight is not None else head(hidden).float()  # (chunk, vocab)


def _target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log-sum-exp of each row of `logits` and log p(target) = logit[target] - lse: (chunk,) each. The one formula
    of every path here, fused or not, with or without gradients."""
    lse = torch.logsumexp(logits, dim=-1)
    return lse, logits.gather(1, targets[:, None]).squeeze(1) - lse


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return -_target_logps(_head_logits(hidden, head), targets)[1].sum()


def linear_weight(head: nn.Module) -> torch.Tensor | None:
    """The weight of a head that computes exactly `hidden @ weight.T`, or None for any other head."""
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    own = getattr(head, "linear_weight", None)  # e.g. model.parts' head wrapper
    return own() if callable(own) else None


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of token cross-entropies of `head(hidden)` against `targets`, chunk by chunk.

    hidden: (tokens, hidden_size) — only positions that carry a loss, so no logits are computed
    for prompt tokens. At most one `(chunk_size, vocab)` float32 block is alive at a time instead
    of the full `(tokens, vocab)` logits and their gradient. A plain linear head (the usual case)
    goes through `LinearCrossEntropy`, which computes the gradients while the chunk's logits are
    at hand; any other head recomputes each chunk's logits in backward (activation checkpointing).
    """
    if hidden.shape[0] == 0:
        # keep the graph connected so DDP and accumulation see a (zero) gradient for every parameter
        return hidden.sum() * 0.0
    weight = linear_weight(head)
    if weight is not None and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h, t, head, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, t, head)
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), gradients computed in the forward pass.

    The loss is a scalar, so its gradient is the upstream scalar times d(loss)/d(inputs). Each chunk's
    gradient of the logits is softmax - one_hot; it is turned into the hidden states' gradient (and the
    weight's, when the weight is trained) at once, while the chunk's logits are in memory. Backward only
    scales what forward stored: the head runs once per token instead of twice (forward, then again
    under checkpointing), and only `(tokens, hidden)` plus, for a trained weight, `(vocab, hidden)` is kept.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Loss sum (float32 scalar); stores the gradients for backward."""
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (tokens, hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None  # (vocab, hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (chunk, hidden)
            t = targets[start : start + chunk_size]  # (chunk,)
            logits = (h @ weight.t()).float()  # (chunk, vocab), as _head_logits
            lse, logp = _target_logps(logits, t)  # (chunk,) each
            total -= logp.sum()
            if need_hidden or need_weight:
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(hidden.dtype)
                if need_hidden:
                    torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_size])
                if need_weight:
                    grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The stored gradients times the upstream scalar."""
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        return (
            (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return _target_logps(_head_logits(hidden, head), targets)[1]  # (chunk,)


def chunked_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target) of every row of `hidden`, chunk by chunk, never holding the full logits: (tokens,)."""
    if hidden.shape[0] == 0:
        return hidden.sum(-1) * 0.0
    weight = linear_weight(head)
    if weight is not None and not weight.requires_grad and torch.is_grad_enabled() and hidden.requires_grad:
        return LinearTokenLogps.apply(hidden, weight, targets, chunk_size, False)[0]  # e.g. LoRA: the head is frozen
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_token_logps, h, t, head, use_reentrant=False))
        else:
            parts.append(_chunk_token_logps(h, t, head))
    return torch.cat(parts)


class LinearTokenLogps(torch.autograd.Function):
    """log p(target) of each row under a frozen linear head, with each row's gradient computed in forward.

    log p_i depends on hidden row i alone, so d(log p_i)/d(hidden_i) = weight.T @ (one_hot_i - softmax_i) is
    one `hidden`-wide row per token, stored while the chunk's logits are in memory; backward multiplies it by
    each token's upstream gradient. The head runs once per token instead of twice. The weight must be frozen
    (its gradient would need every token's upstream gradient, unknown in forward): others take the
    checkpointed path.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens,) float32 log-probabilities, and their entropies (empty unless asked); stores the gradients."""
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (tokens,)
        entropy = torch.empty(hidden.shape[0] if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        rows = torch.empty_like(hidden)  # (tokens, hidden): d log p_i / d hidden_i
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (chunk, hidden)
            t = targets[start : start + chunk_size]  # (chunk,)
            logits = (h @ weight.t()).float()  # (chunk, vocab), as _head_logits
            lse, logps[start : start + t.numel()] = _target_logps(logits, t)
            log_probs = logits.sub_(lse[:, None])  # log-softmax, in place of the logits
            if with_entropy:  # one more (chunk, vocab) buffer, only when asked
                probs = log_probs.exp()
                entropy[start : start + t.numel()] = -torch.einsum("ij,ij->i", probs, log_probs)
                grad_logits = probs.neg_()  # -softmax
            else:
                grad_logits = log_probs.exp_().neg_()  # -softmax, in place
            grad_logits[torch.arange(t.numel(), device=t.device), t] += 1.0
            torch.mm(grad_logits.to(hidden.dtype), weight, out=rows[start : start + chunk_size])
        ctx.save_for_backward(rows)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Each token's stored row times its upstream gradient."""
        (rows,) = ctx.saved_tensors
        return (rows * grad_output[:, None].to(rows.dtype), None, None, None, None)


def chunked_token_logps_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) of every row, with its gradient when autograd records `hidden`, and the entropy of every row's
    next-token distribution, never differentiable: (tokens,) each.

    Without gradients, or under a frozen linear head (LoRA), both come from the same chunks of logits; with
    gradients through any other head, the log-probs take `chunked_token_logps` and the entropy a second pass.
    """
    if torch.is_grad_enabled() and hidden.requires_grad:
        weight = linear_weight(head)
        if hidden.shape[0] and weight is not None and not weight.requires_grad:
            return LinearTokenLogps.apply(hidden, weight, targets, chunk_size, True)
        return (chunked_token_logps(hidden, targets, head, chunk_size),
                _logps_entropy(hidden.detach(), targets, head, chunk_size)[1])
    return _logps_entropy(hidden, targets, head, chunk_size)


@torch.no_grad()
def _logps_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Without gradients: log p(target) and the entropy of the next-token distribution at every row: (tokens,) each."""
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _head_logits(hidden[start : start + chunk_size], head)  # (chunk, vocab)
        lse, logp = _target_logps(logits, targets[start : start + chunk_size])
        logps.append(logp)  # bit-identical to the training paths' log-probs
        log_probs = logits.sub_(lse[:, None])  # log-softmax, in place
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)
