"""Loss masks of rendered chats, compared with hand-written expectations for real chat templates."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import write_jsonl
from tunesmith.data import build_dataset, render_and_mask
from tunesmith.errors import TunesmithError

# SmolLM2-135M-Instruct's template, exactly as its tokenizer ships it (read from the GGUF file).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.1 style: strict user/assistant alternation, no system role.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Mistral style as many fine-tunes extend it: the system prompt opens the first [INST].
MISTRAL_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, since 1561."},
]
SYSTEM_CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Eleven."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


def _tokenizer(base, template: str, *, bos: str | None = None, eos: str | None = None, extra: tuple[str, ...] = ()):
    tok = copy.deepcopy(base)
    special: dict = {"additional_special_tokens": list(extra)}
    if bos:
        special["bos_token"] = bos
    if eos:
        special["eos_token"] = eos
    tok.add_special_tokens(special)
    tok.chat_template = template
    return tok


def _runs(ids: list[int], labels: list[int], tok) -> tuple[list[str], list[str]]:
    """Decoded runs of (trained, untrained) tokens, in order."""
    trained: list[str] = []
    untrained: list[str] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] != -100) != (labels[start] != -100):
            (trained if labels[start] != -100 else untrained).append(tok.decode(ids[start:t]))
            start = t
    return trained, untrained


def _check_labels(ids: list[int], labels: list[int]) -> None:
    assert len(ids) == len(labels)
    assert labels[0] == -100
    assert all(label in (-100, i) for i, label in zip(ids, labels))


def test_smollm2_chatml_default_system_prompt(tiny_tokenizer):
    tok = _tokenizer(tiny_tokenizer, SMOLLM2_TEMPLATE)
    ids, labels = render_and_mask(CHAT, tok)
    _check_labels(ids, labels)
    trained, untrained = _runs(ids, labels, tok)
    assert trained == ["Paris.<|im_end|>", "Madrid, since 1561.<|im_end|>"]
    assert untrained == [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    # the rendered special tokens are single tokens, not their characters
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 5


def test_smollm2_chatml_with_system_and_three_turns(tiny_tokenizer):
    tok = _tokenizer(tiny_tokenizer, SMOLLM2_TEMPLATE)
    ids, labels = render_and_mask(SYSTEM_CHAT, tok)
    _check_labels(ids, labels)
    trained, untrained = _runs(ids, labels, tok)
    assert trained == ["Seven.<|im_end|>", "Eleven.<|im_end|>", "You are welcome.<|im_end|>"]
    assert untrained == [
        "<|im_start|>system\nAnswer in one line.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    assert "SmolLM" not in tok.decode(ids)  # the default system prompt only stands in for a missing one


def test_llama3_template(tiny_tokenizer):
    tok = _tokenizer(
        tiny_tokenizer, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
        extra=("<|start_header_id|>", "<|end_header_id|>"),
    )
    ids, labels = render_and_mask(SYSTEM_CHAT, tok)
    _check_labels(ids, labels)
    trained, untrained = _runs(ids, labels, tok)
    assert trained == ["Seven.<|eot_id|>", "Eleven.<|eot_id|>", "You are welcome.<|eot_id|>"]
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert untrained == [
        "<|begin_of_text|>" + header.format("system") + "Answer in one line.<|eot_id|>"
        + header.format("user") + "Name a prime.<|eot_id|>" + header.format("assistant"),
        header.format("user") + "Another one?<|eot_id|>" + header.format("assistant"),
        header.format("user") + "Thanks<|eot_id|>" + header.format("assistant"),
    ]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_mistral_template(tiny_tokenizer):
    tok = _tokenizer(tiny_tokenizer, MISTRAL_TEMPLATE, bos="<s>", eos="</s>")
    ids, labels = render_and_mask(CHAT, tok)
    _check_labels(ids, labels)
    trained, untrained = _runs(ids, labels, tok)
    # the template's trailing space after </s> is not trained, like a newline after <|im_end|>
    assert trained == ["Paris.</s>", "Madrid, since 1561.</s>"]
    assert untrained == [
        "<s>[INST] What is the capital of France? [/INST]",
        " [INST] And of Spain? [/INST]",
        " ",
    ]


def test_mistral_style_with_system_prompt(tiny_tokenizer):
    tok = _tokenizer(tiny_tokenizer, MISTRAL_SYSTEM_TEMPLATE, bos="<s>", eos="</s>")
    ids, labels = render_and_mask(SYSTEM_CHAT, tok)
    _check_labels(ids, labels)
    trained, untrained = _runs(ids, labels, tok)
    assert trained == [" Seven.</s>", " Eleven.</s>", " You are welcome.</s>"]
    assert untrained == [
        "<s>[INST] Answer in one line.\n\nName a prime. [/INST]",
        "[INST] Another one? [/INST]",
        "[INST] Thanks [/INST]",
    ]


class _SlowView:
    """The tiny tokenizer seen as a Python ("slow") tokenizer, which gives no character offsets."""

    is_fast = False

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tok(text, **kwargs)


def test_tokenizer_without_offsets_gives_the_same_mask(tiny_tokenizer):
    tok = _tokenizer(tiny_tokenizer, SMOLLM2_TEMPLATE)
    assert render_and_mask(SYSTEM_CHAT, _SlowView(tok)) == render_and_mask(SYSTEM_CHAT, tok)


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer):
    # Marks whichever message is last, as templates that drop old reasoning or move the system prompt do.
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %} (latest){% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = _tokenizer(tiny_tokenizer, template)
    with pytest.raises(TunesmithError, match="not prefix-stable at assistant turn 1"):
        render_and_mask(CHAT, tok)


def test_template_exception_becomes_a_clear_error(tiny_tokenizer):
    tok = _tokenizer(tiny_tokenizer, MISTRAL_TEMPLATE, bos="<s>", eos="</s>")
    with pytest.raises(TunesmithError, match="cannot render this conversation.*roles must alternate"):
        render_and_mask(SYSTEM_CHAT, tok)


def test_every_assistant_turn_trained_in_built_rows(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SYSTEM_CHAT}, {"messages": CHAT}])
    data = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=512, packing=False)
    trained = [_runs(r.input_ids, r.labels, tiny_tokenizer)[0] for r in data.rows]
    assert trained == [
        ["Seven.<|im_end|>", "Eleven.<|im_end|>", "You are welcome.<|im_end|>"],
        ["Paris.<|im_end|>", "Madrid, since 1561.<|im_end|>"],
    ]
    assert data.stats.num_trained_tokens == sum(1 for r in data.rows for x in r.labels if x != -100)


def test_prompt_completion_uses_chat_template(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi", "completion": "hi there"}])
    (row,) = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=512, packing=False).rows
    assert tiny_tokenizer.decode(row.input_ids) == (
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"
    )
    assert _runs(row.input_ids, row.labels, tiny_tokenizer)[0] == ["hi there<|im_end|>"]


def test_without_chat_template_prompt_completion_is_raw(tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: two plus two?\nA:", "completion": " four"}])
    (row,) = build_dataset(str(path), tok, labels="assistant", max_length=512, packing=False).rows
    prompt_ids = tok("Q: two plus two?\nA:", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" four", add_special_tokens=False)["input_ids"]
    assert row.input_ids == [tok.bos_token_id, *prompt_ids, *completion_ids, tok.eos_token_id]
    assert row.labels == [-100] * (1 + len(prompt_ids)) + completion_ids + [tok.eos_token_id]


def test_without_chat_template_multi_turn_is_an_error(tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SYSTEM_CHAT}])
    with pytest.raises(TunesmithError, match=r"chat\.jsonl line 1: the tokenizer has no chat template"):
        build_dataset(str(path), tok, labels="assistant", max_length=512, packing=False)


def test_truncation_keeps_the_head_and_counts(tiny_tokenizer, tmp_path):
    long_answer = " ".join(["word"] * 200)
    rows = [{"prompt": "short", "completion": "ok"}, {"prompt": "long", "completion": long_answer}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    full = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=4096, packing=False)
    data = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=64, packing=False)
    assert data.stats.num_truncated == 1 and data.stats.num_dropped == 0
    assert data.rows[0] == full.rows[0]
    assert data.rows[1].input_ids == full.rows[1].input_ids[:64]
    assert data.rows[1].labels == full.rows[1].labels[:64]

    dropped = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=64, packing=False, overflow="drop")
    assert dropped.stats.num_dropped == 1 and dropped.stats.num_truncated == 0
    assert dropped.rows == [full.rows[0]]


def test_truncation_that_cuts_the_whole_response_drops_the_sample(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "x " * 100, "completion": "late"}, {"prompt": "a", "completion": "b"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    data = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=32, packing=False)
    assert data.stats.num_dropped == 1 and data.stats.num_truncated == 0 and len(data.rows) == 1
