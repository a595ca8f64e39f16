"""Builders for the tiny local models and tokenizers the tests train (no downloads)."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_lines(limit: int = 400) -> list[str]:
    """Real English text from CPython's own documentation topics."""
    from pydoc_data.topics import topics

    lines: list[str] = []
    for key in sorted(topics):
        for line in topics[key].splitlines():
            line = line.strip()
            if len(line) > 30:
                lines.append(line)
    return lines[:limit] if limit else lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on pydoc text and save it with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(3000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, width-64 Llama-style model with random weights, saved as safetensors with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- one tiny model per exportable architecture

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def build_qwen_tokenizer(out_dir: Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer split the way Qwen2's is (its regex, NFC), with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(3000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_sentencepiece_tokenizer(out_dir: Path, style: str, vocab_size: int = 640):
    """A SentencePiece-style BPE (byte fallback, ▁ for spaces) in the shape of Gemma's or Llama 2's tokenizer."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    specials = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] if style == "gemma"
                else ["<unk>", "<s>", "</s>"])
    tok = Tokenizer(models.BPE(byte_fallback=True))
    if style == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - 256, show_progress=False)
    tok.train_from_iterator(corpus_lines(3000), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for text, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]]
    if style == "gemma":
        fast = GemmaTokenizer(vocab=vocab, merges=merges)
        fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        fast.chat_template = GEMMA_TEMPLATE
    else:
        fast = LlamaTokenizer(vocab=vocab, merges=merges)
        fast.chat_template = INST_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_arch_model(out_dir: Path, model_type: str, seed: int = 0) -> Path:
    """A 2-layer (Gemma 3: 3) random model of `model_type` with its family's kind of tokenizer, saved as safetensors.

    Every weight, norms included, is random, so a missing export fix (Q/K order, Gemma's 1 + w) shows in the logits.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    if model_type in ("qwen2", "qwen3"):
        tok = build_qwen_tokenizer(out_dir)
    elif model_type in ("gemma2", "gemma3_text"):
        tok = build_sentencepiece_tokenizer(out_dir, "gemma")
    elif model_type == "mistral":
        tok = build_sentencepiece_tokenizer(out_dir, "llama")
    else:
        tok = build_tokenizer(out_dir)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    extra = {
        "llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-5),
        "mistral": dict(tie_word_embeddings=False, sliding_window=None),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(tie_word_embeddings=False, head_dim=32),  # head_dim other than hidden / heads, as Qwen3 has
        "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
        "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=3,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    }[model_type]
    config = AutoConfig.for_model(model_type, **{**shape, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "norm" in name else 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir
