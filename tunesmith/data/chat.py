"""Render conversations with the tokenizer's chat template and mark the assistant tokens that carry loss.

The assistant spans are found by rendering, not by `{% generation %}` tags (most templates lack
them): for assistant turn i, render the turns before it with the generation prompt (`prefix`)
and the turns up to and including it (`upto`); the characters between the two are the
assistant's answer plus the template's end-of-turn marker. This only holds when the template
renders earlier turns the same whatever follows them, so that is checked, never assumed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from tunesmith.errors import TunesmithError
from tunesmith.ops.losses import IGNORE_INDEX

CharSpan = tuple[int, int]  # [start, end) character offsets in the rendered text


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer ships a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_and_mask(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant tokens (-100 elsewhere)."""
    text, spans = render_with_spans(messages, tokenizer, "conversation")
    (ids,), (labels,) = tokenize_with_spans([text], [spans], tokenizer)
    return ids, labels


def render_with_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[CharSpan]]:
    """The full rendered text and the character span of every assistant turn."""
    if not has_chat_template(tokenizer):
        raise TunesmithError(
            f"{where}: the tokenizer has no chat template, so this conversation cannot be rendered; use a "
            "model whose tokenizer ships one (an -Instruct/-Chat model) or set tokenizer.chat_template"
        )
    full = render_chat(messages, tokenizer, False, where)
    spans: list[CharSpan] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(messages[:i], tokenizer, True, where)
        upto = full if i == len(messages) - 1 else render_chat(messages[: i + 1], tokenizer, False, where)
        turn = f"assistant turn {len(spans) + 1} (message {i})"
        if not upto.startswith(prefix):
            raise _not_prefix_stable(
                where, turn, "rendering the turns before it with the generation prompt is not a prefix of "
                "rendering them with this turn", prefix, upto,
            )
        if not full.startswith(upto):
            raise _not_prefix_stable(
                where, turn, "the conversation rendered up to this turn is not a prefix of the whole "
                "conversation rendered", upto, full,
            )
        # Keep the end-of-turn marker (<|im_end|>, <|eot_id|>, </s>) but not the newline after it.
        start, end = len(prefix), len(upto.rstrip())
        if end <= start:
            raise TunesmithError(
                f"{where}: {turn} renders to no text with this chat template; the template seems to drop "
                "assistant messages, so there is nothing to learn"
            )
        spans.append((start, end))
    return full, spans


def tokenize_with_spans(
    texts: Sequence[str], spans: Sequence[list[CharSpan]], tokenizer
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize rendered texts (batched) and label the tokens that start inside a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        all_ids = [list(ids) for ids in enc["input_ids"]]
        all_labels = [_labels_from_offsets(ids, offsets, sp)
                      for ids, offsets, sp in zip(all_ids, enc["offset_mapping"], spans)]
    else:  # no offsets from Python tokenizers: tokenize the pieces between span edges separately
        all_ids, all_labels = [], []
        for text, sp in zip(texts, spans):
            ids, labels = _tokenize_pieces(text, sp, tokenizer)
            all_ids.append(ids)
            all_labels.append(labels)
    for labels in all_labels:
        if labels:
            labels[0] = IGNORE_INDEX  # a document's first token is never predicted
    return all_ids, all_labels


def render_raw(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    """Without a chat template: BOS + prompt + completion + EOS, training on completion + EOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # Tokenized apart, as at generation time, where the prompt is encoded alone.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = bos + prompt_ids + completion_ids + eos
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + completion_ids + eos
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


# ---------------------------------------------------------------- helpers


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool, where: str) -> str:
    """The conversation rendered with the chat template; a template that refuses it is a TunesmithError naming `where`."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template's own raise_exception(), Jinja errors: the data or template is at fault
        raise TunesmithError(
            f"{where}: the tokenizer's chat template cannot render this conversation "
            f"({type(exc).__name__}: {exc}); change the conversation to what the template accepts "
            "(e.g. roles alternating user/assistant, no system message) or set another chat template"
        ) from None
    assert isinstance(text, str), f"apply_chat_template returned {type(text).__name__}"
    return text


def _labels_from_offsets(ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[CharSpan]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    starts = [start for start, _ in offsets]  # non-decreasing
    for span_start, span_end in spans:
        a, b = bisect_left(starts, span_start), bisect_left(starts, span_end)
        labels[a:b] = ids[a:b]
    return labels


def _tokenize_pieces(text: str, spans: list[CharSpan], tokenizer) -> tuple[list[int], list[int]]:
    edges = sorted({0, len(text), *(e for span in spans for e in span)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in zip(edges, edges[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        trained = any(s <= a and b <= e for s, e in spans)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _not_prefix_stable(where: str, turn: str, what: str, shorter: str, longer: str) -> TunesmithError:
    k = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    return TunesmithError(
        f"{where}: the chat template is not prefix-stable at {turn}: {what} (they differ at character {k}: "
        f"{shorter[k:k + 40]!r} vs {longer[k:k + 40]!r}). The template rewrites earlier turns when later ones "
        "are added (e.g. it drops reasoning or moves the system prompt), so the assistant tokens cannot be "
        "located reliably; set a chat template that renders earlier turns unchanged, or split the "
        "conversation into single-turn samples"
    )
