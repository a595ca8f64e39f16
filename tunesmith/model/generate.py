"""Batched generation from chat prompts: our own decode loop over a transformers KV cache.

Why not `model.generate`: rows that finish (EOS or a stop string) leave the batch and the cache
at once, so a short answer never waits for the longest one in its batch; stop strings cut the
text; one progress bar shows new tokens/s across all batches. Prompts are sorted by length
before batching, so little compute goes to padding; outputs come back in the caller's order.

Prompts are rendered exactly as training renders them: the chat template with the assistant
header appended, tokenized without extra special tokens; without a chat template, BOS + the one
user message (see `tunesmith.data.chat.render_raw`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.cache_utils import DynamicLayer

from tunesmith.data.chat import has_chat_template, render_chat
from tunesmith.errors import TunesmithError
from tunesmith.model.decoding import decoding_weights
from tunesmith.model.parts import unwrap


@dataclass(kw_only=True)
class GenerationSettings:
    """How answers are generated."""

    max_new_tokens: int = 128  # most tokens generated per prompt
    temperature: float = 0.0  # 0 = greedy (argmax); above 0 = sample from softmax(logits / temperature)
    top_p: float = 1.0  # sampling keeps the smallest set of tokens whose probability reaches top_p (1 = all)
    top_k: int = 0  # sampling keeps the k most likely tokens (0 = all)
    stop: list[str] = field(default_factory=list)  # a row ends when its text contains one; the text is cut there
    batch_size: int = 16  # prompts decoded together
    seed: int = 0  # seed of the sampling generator; the same seed gives the same samples

    def problems(self) -> list[str]:
        """Every out-of-range value, as messages naming the field, the value and the allowed range."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            out.append(f"temperature: must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"top_k: must be 0 (off) or more, got {self.top_k}")
        if self.batch_size < 1:
            out.append(f"batch_size: must be at least 1, got {self.batch_size}")
        if any(not s for s in self.stop):
            out.append("stop: an empty stop string would end every answer at once; remove it")
        return out

    def check(self) -> None:
        """Raise one TunesmithError listing every problem."""
        problems = self.problems()
        if problems:
            raise TunesmithError("invalid generation settings:", problems=problems)


@dataclass
class Generation:
    """One generated answer."""

    text: str  # decoded answer, special tokens left out, cut before the stop string that ended it
    num_new_tokens: int  # tokens generated, the EOS or stop-string tokens included
    finish_reason: str  # "eos" | "stop" | "length"
    token_ids: list[int] = field(default_factory=list)  # the generated ids, EOS included


# ---------------------------------------------------------------- prompts


def prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation (ending in a user turn) rendered as training renders it, ready for the answer."""
    if not has_chat_template(tokenizer):
        return [_raw_prompt_ids(tokenizer, c, i) for i, c in enumerate(conversations)]
    texts = [render_chat(conversation, tokenizer, True, f"prompt {i}") for i, conversation in enumerate(conversations)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _raw_prompt_ids(tokenizer, conversation: list[dict], i: int) -> list[int]:
    roles = [m["role"] for m in conversation]
    if roles != ["user"]:
        raise TunesmithError(
            f"prompt {i}: the tokenizer has no chat template, so only a single user message can be a prompt "
            f"(rendered as BOS + text, as training renders it), but this conversation has roles {roles}; use a "
            "model whose tokenizer ships a chat template, or single-prompt data"
        )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(conversation[0]["content"], add_special_tokens=False)["input_ids"]


def stop_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends an answer: all EOS ids of the generation config, and the tokenizer's EOS."""
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


# ---------------------------------------------------------------- decoding


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    settings: GenerationSettings | None = None,
    *,
    desc: str = "generate",
    seeds: list[int] | None = None,
) -> list[Generation]:
    """Answers to chat prompts (each ending in a user turn), in the order given.

    With `seeds` (one per conversation) each answer samples from its own generator, so it is the same whatever
    else shares its batch: RL ranks sample their share of a step's prompts and get the one-process answers."""
    settings = settings or GenerationSettings()
    settings.check()
    if not conversations:
        return []
    if seeds is not None and len(seeds) != len(conversations):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(conversations)} conversations")
    encoded = prompt_ids(tokenizer, conversations)
    # Longest first: memory runs out in the first batch if it runs out at all, not after minutes of work.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    sampler = None
    if settings.temperature > 0:
        sampler = torch.Generator(device=device).manual_seed(settings.seed)
    decoder = _Decoder(model, tokenizer, settings, sampler, device)
    row_seeds = seeds if settings.temperature > 0 else None
    results: list[Generation | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="prompt", dynamic_ncols=True, leave=False)
    was_training = model.training
    model.eval()
    try:
        with decoding_weights(model):  # packed CPU weights, LoRA folded in: one fast matmul per layer
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                gens = None if row_seeds is None else [
                    torch.Generator(device=device).manual_seed(row_seeds[i]) for i in batch]
                for i, generation in zip(batch, decoder.run([encoded[i] for i in batch], bar, gens)):
                    results[i] = generation
    finally:
        bar.close()
        model.train(was_training)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


class _Decoder:
    """Decodes one batch of prompts at a time; holds what every batch shares."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, sampler, device: torch.device) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.sampler = sampler
        self.device = device
        self.eos = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(unwrap(model).forward).parameters
        # transformers renamed past_key_values to cache during 5.x; both spellings reach the same argument.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last_logits = "logits_to_keep" in params
        # Caches of separately prefilled rows can be joined only when every layer is a plain growing
        # cache; sliding-window and other layers keep their own state, so they prefill as one batch.
        layers = DynamicCache(config=unwrap(model).config).layers
        self.can_join_caches = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        self.started = time.perf_counter()
        self.num_new_tokens = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
        """Logits of the last position of each row, as float32."""
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.keep_last_logits:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions would cost a (seq, vocab) matmul for nothing
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :].float()  # (rows, vocab)

    def run(self, prompts: list[list[int]], bar: tqdm,
            generators: list[torch.Generator] | None = None) -> list[Generation]:
        """Generate for one batch (longest prompt first); rows leave the batch and the cache as soon as they finish.
        With `generators` (one per prompt) each row samples from its own."""
        settings = self.settings
        logits, cache, attention_mask = self.prefill(prompts)
        next_positions = attention_mask.sum(-1, keepdim=True)  # (rows, 1): real tokens so far

        alive = list(range(len(prompts)))  # batch rows still decoding, in cache order
        tokens: list[list[int]] = [[] for _ in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        for step in range(settings.max_new_tokens):
            next_tokens = self.pick(logits, None if generators is None else [generators[r] for r in alive])  # (alive,)
            finished = []
            for j, (row, token) in enumerate(zip(alive, next_tokens.tolist())):
                tokens[row].append(token)
                result = self.finish(tokens[row], last_step=step == settings.max_new_tokens - 1)
                if result is not None:
                    results[row] = result
                    finished.append(j)
            self.num_new_tokens += len(alive)
            bar.set_postfix_str(f"{self.num_new_tokens / (time.perf_counter() - self.started):.1f} new tok/s",
                                refresh=False)
            if finished:
                bar.update(len(finished))
                if len(finished) == len(alive):
                    break
                gone = set(finished)
                keep = torch.tensor([j for j in range(len(alive)) if j not in gone], device=self.device)
                alive = [row for j, row in enumerate(alive) if j not in gone]
                cache.batch_select_indices(keep)
                attention_mask, next_positions, next_tokens = attention_mask[keep], next_positions[keep], next_tokens[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=-1)
            logits = self.forward(next_tokens[:, None], attention_mask, next_positions, cache)
            next_positions = next_positions + 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def prefill(self, prompts: list[list[int]]):
        """Run the prompts (longest first) through the model: last logits, the KV cache, the attention mask.

        A prompt that comes several times (an RL group samples several answers to each) is run once and
        its cache rows repeated, so the prompt work of a group of n answers is 1/n of what it was.
        """
        width = max(len(p) for p in prompts)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for r, ids in enumerate(prompts):  # left padding: every row's next token goes in the same column
            attention_mask[r, width - len(ids) :] = 1
        distinct: dict[tuple[int, ...], int] = {}
        index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        logits, cache = self.prefill_distinct([list(p) for p in distinct])
        if len(distinct) < len(prompts):
            repeat = torch.tensor(index, device=self.device)
            logits = logits[repeat]
            cache.batch_select_indices(repeat)
        if self.can_join_caches:  # plain growing layers: give them room for every token still to come
            cache.layers = [RoomyLayer(layer, self.settings.max_new_tokens) for layer in cache.layers]
        return logits, cache, attention_mask

    def prefill_distinct(self, prompts: list[list[int]]):
        """Last logits and the KV cache of prompts (longest first), left-padded to the longest.

        Rows are prefilled in groups of similar length and their caches joined: computing padding
        costs as much as computing tokens, and even sorted batches of varied prompts are a third padding.
        """
        from transformers import DynamicCache

        config = unwrap(self.model).config
        width = max(len(p) for p in prompts)
        groups = _prefill_groups([len(p) for p in prompts]) if self.can_join_caches else [list(range(len(prompts)))]
        if len(groups) == 1:
            cache = DynamicCache(config=config)
            return self.forward_padded(prompts, cache), cache
        logits, keys, values = [], [], []
        for group in groups:
            part = DynamicCache(config=config)
            logits.append(self.forward_padded([prompts[r] for r in group], part))
            pad = width - max(len(prompts[r]) for r in group)
            keys.append([F.pad(layer.keys, (0, 0, pad, 0)) for layer in part.layers])  # (rows, heads, width, dim)
            values.append([F.pad(layer.values, (0, 0, pad, 0)) for layer in part.layers])
        cache = DynamicCache(config=config)
        for i in range(len(cache.layers)):
            cache.update(torch.cat([k[i] for k in keys]), torch.cat([v[i] for v in values]), i)
        return torch.cat(logits), cache

    def forward_padded(self, prompts: list[list[int]], cache) -> torch.Tensor:
        """Last logits of left-padded prompts, filling `cache`."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (rows, width): real tokens count from 0
        return self.forward(input_ids, attention_mask, position_ids, cache)

    def pick(self, logits: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """The next token of every row: argmax when greedy, else a seeded sample after temperature, top-k, top-p
        (from the rows' own `generators` when given)."""
        if self.sampler is None:
            return logits.argmax(-1)
        s = self.settings
        return sample(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                      generator=generators if generators is not None else self.sampler)

    def finish(self, tokens: list[int], *, last_step: bool) -> Generation | None:
        """The finished Generation when `tokens` ends the row (EOS, stop string, or length), else None."""
        return finished(tokens, self.eos, self.settings.stop, last_step, self.decode)

    def decode(self, tokens: list[int]) -> str:
        """Text of generated tokens, special tokens left out."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def sample(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One seeded sample per row of `logits` (rows, vocab) after temperature, top-k and top-p filtering;
    `generator` is shared by the rows, or a list of one per row."""
    logits = logits / temperature  # (rows, vocab)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (rows, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform number per row against the cumulated probabilities, in float64
    # so that the tail of a 50k-token vocabulary keeps its share. torch.multinomial draws an
    # exponential number for every token of the vocabulary, which took 7 % of a CPU rollout.
    cdf = logits.softmax(-1).double().cumsum(-1)  # (rows, vocab)
    total = cdf[:, -1:]  # (rows, 1): 1 up to rounding
    if not bool(torch.isfinite(total).all()):
        raise TunesmithError("generation: the model gave NaN or infinite logits; the weights have diverged "
                             "(lower the learning rate, or check train.max_grad_norm)")
    if isinstance(generator, list):  # each row draws from its own: its answer does not depend on its batch
        u = torch.cat([torch.rand((1, 1), generator=g, device=cdf.device, dtype=cdf.dtype) for g in generator])
    else:
        u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = u * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    # The first token whose cumulated probability exceeds u: tokens of probability 0 are never chosen.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def finished(tokens: list[int], eos: set[int], stop: list[str], last_step: bool,
             decode: Callable[[list[int]], str]) -> Generation | None:
    """The finished Generation when `tokens` ends an answer (EOS, a stop string, or its last step), else None."""
    if tokens[-1] in eos:
        return Generation(text=decode(tokens[:-1]), num_new_tokens=len(tokens), finish_reason="eos",
                          token_ids=list(tokens))
    if not (stop or last_step):
        return None
    text = decode(tokens)
    # The whole text is searched, not its tail: a multi-byte character can change the decoded tail.
    cuts = [k for k in (text.find(s) for s in stop) if k >= 0]
    if cuts:
        return Generation(text=text[: min(cuts)], num_new_tokens=len(tokens), finish_reason="stop",
                          token_ids=list(tokens))
    if last_step:
        return Generation(text=text, num_new_tokens=len(tokens), finish_reason="length", token_ids=list(tokens))
    return None


class RoomyLayer(DynamicLayer):
    """A growing KV-cache layer that writes each new token into room kept at its end.

    transformers' DynamicLayer concatenates at every step, copying the whole cache of every layer: 17 % of
    a CPU decode step at 16 rows and 100 tokens. Here keys and values are views of longer buffers, and a
    step writes one column; only rows leaving the batch (and running out of room) copy.
    """

    def __init__(self, layer: DynamicLayer, room: int) -> None:
        super().__init__()
        self.room = room
        self.key_buffer = self.value_buffer = None
        if layer.is_initialized:
            self.lazy_initialization(layer.keys, layer.values)
            if layer.keys.numel():
                self._grow(layer.keys, layer.values)

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, coming: int = 0) -> None:
        """New buffers holding `keys`/`values` and room for `self.room` (at least `coming`) more tokens."""
        batch, heads, length, dim = keys.shape
        room = max(self.room, coming)
        self.key_buffer = keys.new_empty((batch, heads, length + room, dim))
        self.value_buffer = values.new_empty((batch, heads, length + room, values.shape[-1]))
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens after the cached ones; returns views of all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        if self.key_buffer is None or length + key_states.shape[-2] > self.key_buffer.shape[-2]:
            if length == 0:
                self._grow(key_states, value_states)
                return self.keys, self.values
            self._grow(self.keys, self.values, key_states.shape[-2])
        end = length + key_states.shape[-2]
        self.key_buffer[:, :, length:end] = key_states
        self.value_buffer[:, :, length:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the `indices` rows (buffers and views)."""
        if self.key_buffer is not None:
            length = self.get_seq_length()
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times (buffers and views)."""
        if self.key_buffer is not None:
            length = self.get_seq_length()
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Rows in the order of `beam_idx` (buffers and views)."""
        self.batch_select_indices(beam_idx)


def _prefill_groups(lengths: list[int], max_padding: float = 0.1) -> list[list[int]]:
    """Consecutive rows (sorted longest first) in groups whose padding stays under `max_padding` of their tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for r, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > (1 + max_padding) * (total + n):
            groups.append(current)
            current, longest, total = [], 0, 0
        current.append(r)
        longest, total = max(longest, n), total + n
    groups.append(current)
    return groups
