"""Continuous batching: one running decode batch that requests join and leave, for `chat` and `serve`.

`generate` (model/generate.py) decodes a known list of prompts. A server does not know its prompts in advance:
requests arrive while others are half-way through. The engine keeps one batch decoding on a thread of its own.
At every step, requests that arrived are prefilled together and their KV caches joined to the running batch
(left-padded to a common width: every row writes its next token into the same column), every row gets its next
token, and finished or cancelled rows leave the batch and the cache at once. So 16 clients share each step's
matmuls instead of queueing.

Each request brings its own settings (greedy or seeded sampling, top-p/top-k, stop strings, token budget) and,
when the engine serves several LoRA adapters on one base, its adapter: peft computes each row's adapter in the
same forward (`adapter_names`), over base weights held once. Text is streamed as it is decoded, holding back an
incomplete UTF-8 character and anything that could still become a stop string.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.model.decoding import decoding_weights
from tunesmith.model.generate import (
    Generation,
    GenerationSettings,
    RoomyLayer,
    finished,
    sample,
    stop_token_ids,
)
from tunesmith.model.parts import unwrap

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a batch of rows with different adapters
_TRIM_FROM = 16  # left-padding columns every row has, from which the cache is cut back


@dataclass
class Request:
    """One generation asked of the engine, and what it produced."""

    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: str | None = None  # the LoRA adapter to answer with (None: the base model)
    on_text: Callable[[str], None] | None = None  # called on the engine's thread with each new piece of text
    on_done: Callable[[Request], None] | None = None  # called on the engine's thread once it has finished or failed
    result: Generation | None = None
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when its first token was decoded (perf_counter)

    def cancel(self) -> None:
        """Stop generating for this request (its client went away); its row leaves the batch at the next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Generation:
        """Block until the request is done; its Generation, or the error that ended it."""
        if not self.done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    position: int  # the position of the row's next token (its real tokens so far)
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already handed to on_text


class Engine:
    """One model (or one base with several LoRA adapters) decoding every submitted request in one running batch."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, adapters: list[str] | None = None) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.adapters = list(adapters or [])  # several adapters chosen per row: the model is a PeftModel holding them
        self.device = next(model.parameters()).device
        self.config = unwrap(model).config
        text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.context_length = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        self.eos = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache_arg = "cache" if "cache" in _forward_params(unwrap(model)) else "past_key_values"
        self.keep_last_logits = "logits_to_keep" in _forward_params(unwrap(model))
        layers = DynamicCache(config=self.config).layers
        # rows can join a running batch only when every layer is a plain growing cache (no sliding windows)
        self.can_join = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, columns) 1 on real tokens
        self._logits: torch.Tensor | None = None  # (rows, vocab) of each row's next token
        self.num_new_tokens = 0
        self.num_steps = 0

    # ---------------------------------------------------------------- the callers' side

    def start(self) -> Engine:
        """Start the decoding thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel what is running, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self, prompt_ids: list[int], settings: GenerationSettings, adapter: str | None = None) -> None:
        """Refuse, with the limits named, what the engine cannot do: a prompt or answer beyond the context, bad settings."""
        settings.check()
        if not prompt_ids:
            raise TunesmithError("the prompt is empty: give at least one token of prompt")
        if adapter is not None and adapter not in self.adapters:
            raise TunesmithError(f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.adapters) or 'none'}")
        if self.context_length is not None:
            if len(prompt_ids) >= self.context_length:
                raise TunesmithError(f"the prompt has {len(prompt_ids)} tokens, and this model's context holds "
                                     f"{self.context_length} in all; shorten the prompt")
            if len(prompt_ids) + settings.max_new_tokens > self.context_length:
                raise TunesmithError(
                    f"max_tokens={settings.max_new_tokens} with a prompt of {len(prompt_ids)} tokens exceeds this "
                    f"model's context of {self.context_length} tokens; ask for at most "
                    f"{self.context_length - len(prompt_ids)} new tokens")

    def submit(self, prompt_ids: list[int], settings: GenerationSettings, *, adapter: str | None = None,
               on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:
        """Queue a request (checked first); it joins the running batch at the next step."""
        self.check(prompt_ids, settings, adapter)
        request = Request(list(prompt_ids), settings, adapter, on_text, on_done)
        with self._cond:
            if self._stopping:
                raise TunesmithError("the engine is shutting down")
            self._pending.append(request)
            self._cond.notify_all()
        self.start()
        return request

    def generate(self, prompt_ids: list[int], settings: GenerationSettings, *, adapter: str | None = None,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """Submit one request and wait for its answer."""
        return self.submit(prompt_ids, settings, adapter=adapter, on_text=on_text).wait()

    @property
    def num_running(self) -> int:
        """Rows decoding now, plus requests waiting to join."""
        return len(self._rows) + len(self._pending)

    # ---------------------------------------------------------------- the engine's thread

    def _run(self) -> None:
        with torch.no_grad(), decoding_weights(self.model, merge_lora=not self.adapters):
            while True:
                with self._cond:
                    while not self._stopping and not self._pending and not self._rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                    joining = []
                    room = self.max_batch - len(self._rows)
                    if self.can_join or not self._rows:
                        while self._pending and len(joining) < room:
                            joining.append(self._pending.popleft())
                try:
                    joining = [r for r in joining if not self._settle_cancelled(r)]
                    if joining:
                        self._join(joining)
                    if self._rows:
                        self._step()
                except Exception as exc:  # a failed step fails its rows; the engine goes on serving
                    for request in [row.request for row in self._rows] + joining:
                        self._fail(request, exc)
                    self._rows, self._cache, self._mask, self._logits = [], None, None, None
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for request in pending + [row.request for row in self._rows]:
            self._fail(request, TunesmithError("the engine shut down before this request finished"))
        self._rows, self._cache = [], None

    def _settle_cancelled(self, request: Request) -> bool:
        if request.cancelled:
            self._fail(request, TunesmithError("cancelled"))
        return request.cancelled

    def _fail(self, request: Request, exc: BaseException) -> None:
        if not request.done.is_set():
            request.error = exc
            self._done(request)

    def _done(self, request: Request) -> None:
        request.done.set()
        if request.on_done is not None:
            request.on_done(request)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
                 adapters: list[str | None]) -> torch.Tensor:
        """Logits (rows, vocab) of each row's last position, as float32."""
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.keep_last_logits:
            kwargs["logits_to_keep"] = 1
        if self.adapters:
            kwargs["adapter_names"] = [a if a is not None else BASE_ADAPTER for a in adapters]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :].float()

    def _join(self, requests: list[Request]) -> None:
        """Prefill the new requests together and join their rows to the running batch."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token goes in the same column
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.config)
        logits = self._forward(input_ids, mask, positions, cache, [r.adapter for r in requests])
        rows = [_Row(r, _generator(r.settings, self.device), len(r.prompt_ids)) for r in requests]
        if not self._rows:
            self._rows, self._mask, self._logits = rows, mask, logits
            if self.can_join:  # plain growing layers: give them room for every token still to come
                cache.layers = [RoomyLayer(layer, self._room()) for layer in cache.layers]
            self._cache = cache
        else:
            assert self._cache is not None and self._mask is not None and self._logits is not None
            total = max(self._mask.shape[1], width)
            old_pad, new_pad = total - self._mask.shape[1], total - width
            layers = [
                (torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys, new_pad)]),
                 torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values, new_pad)]))
                for old, new in zip(self._cache.layers, cache.layers)
            ]
            self._mask = torch.cat([F.pad(self._mask, (old_pad, 0)), F.pad(mask, (new_pad, 0))])
            self._logits = torch.cat([self._logits, logits])
            self._rows = self._rows + rows
            self._cache = self._roomy(layers)

    def _roomy(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        """A cache holding `layers`' keys and values, in layers that write new tokens in place (joinable models only)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i, (keys, values) in enumerate(layers):
            cache.update(keys, values, i)
        cache.layers = [RoomyLayer(layer, self._room()) for layer in cache.layers]
        return cache

    def _room(self) -> int:
        """The most tokens any row may still add to the cache."""
        return max(r.request.settings.max_new_tokens - len(r.tokens) for r in self._rows)

    def _step(self) -> None:
        """Pick every row's next token, hand out text, let finished rows leave, and run the rest one token on."""
        assert self._logits is not None and self._mask is not None
        next_tokens = self._logits.argmax(-1)  # (rows,)
        for i, row in enumerate(self._rows):
            s = row.request.settings
            if row.generator is not None:
                next_tokens[i] = sample(self._logits[i : i + 1], temperature=s.temperature, top_k=s.top_k,
                                        top_p=s.top_p, generator=row.generator)[0]
        keep = []
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(self._rows, next_tokens.tolist())):
            request = row.request
            if request.cancelled:
                self._settle_cancelled(request)
                continue
            row.tokens.append(token)
            request.first_token = request.first_token or now
            result = finished(row.tokens, self.eos, request.settings.stop,
                              len(row.tokens) >= request.settings.max_new_tokens, self._decode)
            if result is not None:
                self._stream(row, final=result.text)
                request.result = result
                self._done(request)
                continue
            self._stream(row)
            keep.append(i)
        self.num_new_tokens += len(self._rows)
        self.num_steps += 1
        if len(keep) < len(self._rows):
            if not keep:
                self._rows, self._cache, self._mask, self._logits = [], None, None, None
                return
            index = torch.tensor(keep, device=self.device)
            self._rows = [self._rows[i] for i in keep]
            self._cache.batch_select_indices(index)
            self._mask, next_tokens = self._mask[index], next_tokens[index]
            self._trim()
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=-1)
        positions = torch.tensor([[row.position] for row in self._rows], device=self.device)
        self._logits = self._forward(next_tokens[:, None], self._mask, positions, self._cache,
                                     [row.request.adapter for row in self._rows])
        for row in self._rows:
            row.position += 1

    def _trim(self) -> None:
        """Cut the columns of left padding that every remaining row has (the rows that needed them left)."""
        assert self._mask is not None
        first = int(self._mask.any(0).long().argmax())
        if first < _TRIM_FROM:
            return
        self._mask = self._mask[:, first:]
        self._cache = self._roomy([(layer.keys[:, :, first:], layer.values[:, :, first:]) for layer in self._cache.layers])

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _stream(self, row: _Row, final: str | None = None) -> None:
        """Hand the row's new text to its callback: all of it at the end, else what can no longer change."""
        callback = row.request.on_text
        if callback is None:
            return
        if final is not None:
            text = final
        else:
            text = self._decode(row.tokens)
            hold = 1 if text.endswith("\ufffd") else 0  # an incomplete UTF-8 character
            for stop in row.request.settings.stop:  # a tail that a stop string may still complete
                hold = max([hold] + [k for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])])
            text = text[: len(text) - hold]
        if len(text) > row.emitted:
            callback(text[row.emitted:])
            row.emitted = len(text)


def _generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    """The row's own sampling generator (None when greedy), seeded with the request's seed."""
    if settings.temperature <= 0:
        return None
    return torch.Generator(device=device).manual_seed(settings.seed)


def _pad_left(t: torch.Tensor, columns: int) -> torch.Tensor:
    """(rows, heads, length, dim) with `columns` zero positions in front."""
    return F.pad(t, (0, 0, columns, 0)) if columns else t


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
