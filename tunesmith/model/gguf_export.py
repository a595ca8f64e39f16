"""Export to GGUF, the file llama.cpp, Ollama and LM Studio run, in pure Python, checked against the original.

`export` takes a model (a run folder, an HF folder, a hub id, a .gguf, 'default') and writes:

    OUT.gguf      weights (f32, f16, bf16, q8_0 or q4_0), the architecture's metadata, the whole tokenizer
                  (vocabulary, merges, token types, special ids, add-BOS/EOS flags, pre-tokenizer) and the
                  chat template, under llama.cpp's names (gguf.GGUFWriter)
    Modelfile     next to it, for `ollama create NAME -f Modelfile`: FROM, TEMPLATE, stop tokens, SYSTEM

The file is written into a temporary sibling, checked, and only then renamed into place: an interrupted or
failed export never leaves a half file under the final name. The check reloads the file with transformers'
GGUF reader and decodes a few prompts greedily with both models (`tunesmith.model.generate.generate`): at f32
every prompt must give the same tokens, lower precisions report how many do.

What each architecture needs (facts from llama.cpp's `convert_hf_to_gguf.py`; the code is ours):

    llama, mistral (llama.cpp: llama)   Q and K rows permuted: HF rotates the two halves of each head,
                                        llama.cpp rotates adjacent pairs; llama3 rope scaling as rope_freqs
    qwen2, qwen3                        as stored; q/k biases (qwen2), q/k norms (qwen3)
    gemma2, gemma3 (text)               every RMSNorm weight stored as 1 + w (HF adds the 1 at run time)
    all                                 tied embeddings: no output.weight, llama.cpp reuses token_embd

`export_lora` writes a LoRA run's adapter alone as a GGUF LoRA adapter (`llama-cli -m base.gguf --lora
adapter.gguf`): general.type=adapter, adapter.type=lora, adapter.lora.alpha, tensors `<base name>.lora_a` and
`.lora_b` (B permuted like its base weight's rows where the base is permuted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model.export import fsync_dir
from tunesmith.model.generate import GenerationSettings, generate, stop_token_ids
from tunesmith.model.loading import load_model, load_tokenizer, resolve_model
from tunesmith.model.runs import is_run_dir, load_run, run_base_spec, run_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
MODELFILE = "Modelfile"
CHECK_MAX_NEW_TOKENS = 32
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Explain in one sentence what a file format is.",
    "Give me a short recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
)


# ---------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    """How one HF model type becomes a llama.cpp architecture."""

    gguf_arch: str  # llama.cpp's name for it
    permute_qk: bool = False  # Q/K rows reordered for llama.cpp's rotary layout
    norm_shift: float = 0.0  # added to every RMSNorm weight (Gemma computes x * (1 + w))
    # config fields transformers' GGUF reader does not read back (so the check takes them from the original)
    unread: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permute_qk=True, unread=("rope_parameters",)),
    "mistral": Architecture("llama", permute_qk=True, unread=("rope_parameters", "sliding_window")),
    "qwen2": Architecture("qwen2", unread=("rope_parameters",)),
    "qwen3": Architecture("qwen3", unread=("head_dim", "rope_parameters")),
    "gemma2": Architecture("gemma2", norm_shift=1.0, unread=(
        "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types", "rope_parameters")),
    "gemma3_text": Architecture("gemma3", norm_shift=1.0, unread=(
        "query_pre_attn_scalar", "final_logit_softcapping", "layer_types", "rope_parameters")),
}
NAMES = {"llama": "Llama (SmolLM2, Llama 2/3)", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
         "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)"}


def supported_architectures() -> str:
    """The model types export can write, for error messages."""
    return ", ".join(f"{k} ({v})" for k, v in NAMES.items())


def architecture_of(config: PretrainedConfig) -> Architecture:
    """The export recipe of a model's config; a clear error, listing the supported ones, for any other."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    hint = ""
    if model_type == "gemma3":
        hint = " (Gemma 3 with its vision tower: export a text-only Gemma3ForCausalLM checkpoint instead)"
    raise TunesmithError(
        f"export: cannot write model type {model_type!r}{hint} to GGUF; supported model types: "
        f"{supported_architectures()}. Convert other models with llama.cpp's convert_hf_to_gguf.py"
    )


def _rope(config: PretrainedConfig, layer_type: str = "full_attention") -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    elif "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"] if layer_type == "full_attention" else {}
    params = dict(params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _architecture_problems(config: PretrainedConfig, arch: Architecture) -> list[str]:
    """What llama.cpp would compute differently from the HF model; found before anything is written."""
    problems = []
    rope_type = _rope(config).get("rope_type", "default")
    allowed = {"default", "linear", "yarn"} | ({"llama3"} if arch.gguf_arch == "llama" else set())
    if rope_type not in allowed:
        problems.append(f"rope scaling {rope_type!r} is not written by this exporter (it writes "
                        f"{', '.join(sorted(allowed))} for {arch.gguf_arch})")
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("qwen2 with use_sliding_window=true: llama.cpp's qwen2 attends to the whole context")
    if arch.gguf_arch in ("gemma2", "gemma3"):
        scalar = getattr(config, "query_pre_attn_scalar", None)
        allowed_scalars = {_head_dim(config), config.hidden_size // config.num_attention_heads}
        if scalar is not None and scalar not in allowed_scalars:
            problems.append(f"query_pre_attn_scalar={scalar}: llama.cpp scales attention by 1/sqrt(head_dim) "
                            f"({_head_dim(config)})")
    if arch.gguf_arch == "gemma3" and _rope(config, "sliding_attention").get("rope_type", "default") != "default":
        problems.append("gemma3 with rope scaling on its sliding-window layers: llama.cpp scales the global ones only")
    return problems


# ---------------------------------------------------------------- metadata


def _add_metadata(writer, config: PretrainedConfig, arch: Architecture, file_type: int, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if arch.gguf_arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch.gguf_arch in ("gemma2", "gemma3"):
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        layer_types = getattr(config, "layer_types", None) or []
        if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        local = _rope(config, "sliding_attention").get("rope_theta")
        if arch.gguf_arch == "gemma3" and local is not None:
            writer.add_rope_freq_base_swa(float(local))


def _llama3_rope_factors(config: PretrainedConfig) -> torch.Tensor:
    """llama.cpp's per-frequency divisors for llama3 rope scaling (its rope_freqs tensor)."""
    rope = _rope(config)
    dim = _head_dim(config)
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ---------------------------------------------------------------- tokenizer

# llama.cpp's pre-tokenizer names, by the shape of tokenizer.json's pre_tokenizer
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocab:
    """The tokenizer as llama.cpp stores it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    pre: str  # pre-tokenizer name
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    return [s for n in node.get("pretokenizers", node.get("normalizers", [node])) for s in _steps(n)] \
        if node.get("type") == "Sequence" else [node]


def _pre_tokenizer_name(tok: dict) -> str:
    shape = []
    for step in _steps(tok.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                shape.append(("ByteLevel(add_prefix_space)", None))
                continue
            shape.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            shape.append(("Digits", bool(step.get("individual_digits"))))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            shape.append(("Split", (step.get("pattern") or {}).get("Regex")))
        else:
            shape.append((kind, None))
    name = _PRE_TOKENIZERS.get(tuple(shape))
    normalizers = [n.get("type") for n in _steps(tok.get("normalizer"))]
    if name is None or any(n != "NFC" for n in normalizers):
        raise TunesmithError(
            f"export: the tokenizer splits text in a way llama.cpp is not told about here (pre-tokenizer "
            f"{[s[0] for s in shape]}, normalizer {normalizers or None}); supported byte-level BPE pre-tokenizers: "
            "GPT-2, SmolLM, Llama 3, Qwen2. Convert this model with llama.cpp's convert_hf_to_gguf.py"
        )
    return name


def _is_sentencepiece(tok: dict) -> bool:
    model = tok.get("model") or {}
    if not model.get("byte_fallback"):
        return False
    steps = [*_steps(tok.get("normalizer")), *_steps(tok.get("pre_tokenizer"))]
    return any(s.get("type") == "Metaspace" or (s.get("type") == "Replace" and s.get("content") == "▁")
               for s in steps)


def _sentencepiece_prefix(tok: dict) -> bool:
    """Whether the tokenizer puts ▁ before the text (SentencePiece's add_dummy_prefix)."""
    for step in [*_steps(tok.get("normalizer")), *_steps(tok.get("pre_tokenizer"))]:
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _merge_strings(tok: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in (tok.get("model") or {}).get("merges", [])]


def build_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: set[int]) -> Vocab:
    """Everything llama.cpp needs to tokenize exactly as `tokenizer` does, for a model of `vocab_size` rows."""
    import gguf

    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise TunesmithError("export: the tokenizer has no tokenizer.json (a slow-only tokenizer); save it with a "
                             "fast tokenizer (tokenizers library) first")
    tok = json.loads(tokenizer.backend_tokenizer.to_str())
    if (tok.get("model") or {}).get("type") != "BPE":
        raise TunesmithError(f"export: tokenizer model {(tok.get('model') or {}).get('type')!r} is not written here; "
                             "byte-level BPE and SentencePiece-style BPE are")
    sentencepiece = _is_sentencepiece(tok)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise TunesmithError(f"export: the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
                             f"{vocab_size} rows; resize the model's embeddings to the tokenizer first")
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_TOKEN.match(text):
            types[i] = int(gguf.TokenType.BYTE)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = _merge_strings(tok)
    out = Vocab(model="llama" if sentencepiece else "gpt2", pre="default" if sentencepiece else _pre_tokenizer_name(tok),
                tokens=tokens, types=types, merges=merges)
    if sentencepiece:
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest; HF's BPE applies merges
        # by rank. Scoring each token by minus the rank of the first merge that makes it gives the same order.
        scores = [0.0] * vocab_size
        made = {}
        for rank, merge in enumerate(merges):
            made.setdefault(merge.replace(" ", ""), rank)
        for text, i in vocab.items():
            if i not in added and len(text) > 1 and not _BYTE_TOKEN.match(text):
                scores[i] = -float(made.get(text, len(merges) + i))
        out.scores = scores
        out.add_space_prefix = _sentencepiece_prefix(tok)
        if any(len(m.split(" ")) != 2 for m in merges):
            out.merges = []  # a piece with a space in it cannot be written as "a b"; the scores carry the order
        if tokenizer.unk_token_id is not None:
            out.types[tokenizer.unk_token_id] = int(gguf.TokenType.UNKNOWN)
    elif any(len(m.split(" ")) != 2 for m in merges):
        raise TunesmithError("export: a merge of the byte-level vocabulary contains a space; this tokenizer.json is damaged")
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            out.special_ids[key] = int(value)
    others = sorted(i for i in stop_ids if i != tokenizer.eos_token_id)
    if others:
        out.special_ids["eot"] = others[0]
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(plain)
    out.add_bos = extra > 0 and tokenizer.bos_token_id is not None and with_special[0] == tokenizer.bos_token_id
    out.add_eos = extra > 0 and tokenizer.eos_token_id is not None and with_special[-1] == tokenizer.eos_token_id
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    out.chat_template = template or None
    return out


def _add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for key, value in vocab.special_ids.items():
        getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------- tensors


def _permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection (or bias) from HF's rotate-half layout to llama.cpp's adjacent pairs."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass
class PlannedTensor:
    """One tensor of the file: its name, shape, type and how to make its data."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes in the file."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def _file_type(quant: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def _tensor_type(name: str, shape: tuple[int, ...], quant: str) -> int:
    """llama.cpp's choices: norms and vectors in f32; q4_0 keeps the embedding and the output head at q8_0."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    if qtype == T.Q4_0 and name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return T.F16  # a row that is not whole blocks cannot be quantised
    return qtype


def plan_tensors(state: Mapping[str, torch.Tensor], config: PretrainedConfig, arch: Architecture,
                 quant: str) -> list[PlannedTensor]:
    """Every tensor of the file, named and typed, before any data is converted; unknown tensors are an error."""
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or arch.gguf_arch in ("gemma2", "gemma3")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    planned, unknown = [], []
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
            continue

        def make(key: str = key, name: str = name) -> torch.Tensor:
            data = state[key].detach().to("cpu", torch.float32)
            if arch.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute_rotary(data, n_head)
            elif arch.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute_rotary(data, n_kv)
            if arch.norm_shift and key.endswith("norm.weight"):
                data = data + arch.norm_shift
            return data

        shape = tuple(tensor.shape)
        planned.append(PlannedTensor(name, shape, _tensor_type(name, shape, quant), make))
    if unknown:
        raise TunesmithError(f"export: {len(unknown)} tensors of this {config.model_type} model have no llama.cpp "
                             f"name (first: {', '.join(unknown[:3])}); it is not a plain {config.model_type} "
                             "checkpoint, so this exporter cannot write it")
    if _rope(config).get("rope_type") == "llama3" and arch.gguf_arch == "llama":
        factors = _llama3_rope_factors(config)
        planned.append(PlannedTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                                     lambda: factors))
    return planned


def _encode(tensor: torch.Tensor, qtype: int) -> np.ndarray:
    import gguf

    data = tensor.numpy()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


# ---------------------------------------------------------------- writing


@contextmanager
def _temp_beside(out: Path) -> Iterator[Path]:
    """A temporary path next to `out`, removed on the way out unless it was renamed into place."""
    tmp = out.with_name(f".{out.stem}.tmp-{uuid.uuid4().hex[:12]}{out.suffix}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, out: Path) -> None:
    """Flush `tmp` to disk and rename it to `out` (atomic on one file system)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    fsync_dir(out.parent)


def _write(writer, path: Path, tensors: list[PlannedTensor], desc: str) -> None:
    """Write header, metadata, tensor index and then each tensor's data, one tensor in memory at a time."""
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(tensors, desc=desc, unit="tensor", dynamic_ncols=True, leave=False):
            writer.write_tensor_data(_encode(t.make(), t.qtype))
    finally:
        writer.close()


def check_out_path(path: str | Path, flag: str) -> Path:
    """The output file `path` as an absolute path, checked: a .gguf file name, not a folder, not under a file."""
    out = Path(path).expanduser().absolute()
    if out.suffix.lower() != ".gguf":
        raise TunesmithError(f"{flag}: {str(path)!r} does not end in .gguf; give a file name such as model.gguf")
    if out.is_dir():
        raise TunesmithError(f"{flag}: {str(out)!r} is a folder; give a file name inside it, such as {out / 'model.gguf'}")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise TunesmithError(f"{flag}: {str(above)!r} is a file, so {str(out)!r} cannot be written under it")
    return out


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TunesmithError(f"cannot create the folder {str(out.parent)!r} for {out.name}: {exc}") from exc


# ---------------------------------------------------------------- Ollama Modelfile


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


@dataclass
class _Turns:
    """A chat template as text around each message: what Ollama's Go templates can express."""

    start: str
    wrap: dict[str, tuple[str, str]]
    generation: str
    default_system: str | None

    def render(self, messages: list[dict], generation: bool) -> str:
        out = self.start
        if messages[0]["role"] != "system" and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}, *messages]
        for m in messages:
            before, after = self.wrap[m["role"]]
            out += before + m["content"] + after
        return out + (self.generation if generation else "")


def _chat_turns(tokenizer) -> _Turns | None:
    """The template's per-role text, read off rendered probes and confirmed on others; None if it is not that simple."""
    s, u, a, u2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01USR2\x01"
    try:
        full = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                   {"role": "assistant", "content": a}, {"role": "user", "content": u2}], False)
        gen = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], True)
        plain = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], False)
        no_system = _render(tokenizer, [{"role": "user", "content": u}], False)
    except Exception:  # a template that raises on some probe (e.g. one that refuses system messages)
        return None
    if not gen.startswith(plain) or any(full.count(x) != 1 for x in (s, u, a, u2)):
        return None
    generation = gen[len(plain):]
    head, rest = full.split(s)
    sys_after_user_before, rest = rest.split(u)
    user_after_asst_before, rest = rest.split(a)
    asst_after_user_before, user2_after = rest.split(u2)
    user_after = user2_after
    if not user_after_asst_before.startswith(user_after):
        return None
    asst_before = user_after_asst_before[len(user_after):]
    # Where the assistant's turn ends and the next user turn starts is ambiguous in the text; try first the cut
    # that ends the assistant's turn as the user's turn ends.
    cuts = sorted(range(len(asst_after_user_before) + 1), key=lambda k: (asst_after_user_before[:k] != user_after, k))
    for split in cuts:
        asst_after, user_before = asst_after_user_before[:split], asst_after_user_before[split:]
        if not sys_after_user_before.endswith(user_before):
            continue
        sys_after = sys_after_user_before[: len(sys_after_user_before) - len(user_before)]
        for cut in range(len(head) + 1):  # whatever precedes the system turn (a BOS) and the turn's own start
            turns = _Turns(head[:cut], {"system": (head[cut:], sys_after), "user": (user_before, user_after),
                                        "assistant": (asst_before, asst_after)}, generation, None)
            if no_system.startswith(turns.start):
                implied = no_system[len(turns.start):]
                sys_before, sys_end = turns.wrap["system"]
                if implied.startswith(sys_before) and sys_end and sys_end + user_before in implied:
                    turns.default_system = implied[len(sys_before): implied.index(sys_end + user_before)]
                    if sys_before + turns.default_system + sys_end + user_before + u + user_after != implied:
                        turns.default_system = None
            if _confirm(tokenizer, turns):
                return turns
    return None


def _confirm(tokenizer, turns: _Turns) -> bool:
    probes = [
        [{"role": "user", "content": "Hi there."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"},
         {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
    ]
    try:
        return all(turns.render(p, g) == _render(tokenizer, p, g) for p in probes for g in (True, False))
    except Exception:
        return False


def _go_text(text: str) -> str:
    """Literal text inside a Go template."""
    return text.replace("{{", '{{ "{{" }}')


def _quoted(text: str) -> str:
    return '"""' + text + '"""' if '"""' not in text else json.dumps(text)


def modelfile_text(gguf_name: str, tokenizer: PreTrainedTokenizerBase, stop_texts: list[str],
                   add_bos: bool) -> tuple[str, bool]:
    """An Ollama Modelfile for `gguf_name` (FROM, TEMPLATE, stop tokens, SYSTEM) and whether it has a TEMPLATE."""
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}", ""]
    turns = _chat_turns(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if turns is not None:
        start = turns.start
        bos = tokenizer.bos_token or ""
        if add_bos and bos and start.startswith(bos):
            start = start[len(bos):]  # the tokenizer adds BOS itself
        role_parts = []
        for i, role in enumerate(("system", "user", "assistant")):
            before, after = turns.wrap[role]
            keyword = "if" if i == 0 else "else if"
            role_parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(before)}{{{{ .Content }}}}{_go_text(after)}')
        # No whitespace trimming ({{- ... -}}): the text between the actions is the template's, newlines included.
        template = (
            _go_text(start)
            + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + "".join(role_parts)
            + "{{ end }}"
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{_go_text(turns.generation)}{{{{ end }}}}'
            + "{{ end }}"
        )
        lines += [f"TEMPLATE {_quoted(template)}", ""]
    elif getattr(tokenizer, "chat_template", None):
        lines += ["# The chat template could not be written as an Ollama template; Ollama falls back to the",
                  "# template stored in the GGUF (tokenizer.chat_template) where it recognises it.", ""]
    for text in stop_texts:
        lines.append(f"PARAMETER stop {json.dumps(text)}")
    if turns is not None and turns.default_system:
        lines += ["", f"SYSTEM {_quoted(turns.default_system)}"]
    return "\n".join(lines) + "\n", turns is not None


def _write_text_atomically(path: Path, text: str) -> None:
    with _temp_beside(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        _publish(tmp, path)


# ---------------------------------------------------------------- the check


@dataclass
class CheckResult:
    """How the written file compares with the original model."""

    prompts: int
    agree: int  # prompts whose greedy tokens are all the same
    tokens: int = 0  # tokens the original generated
    matched: int = 0  # of those, the ones the file's answer had too before its first difference
    first_difference: str | None = None  # the first prompt whose tokens differ, with both answers
    tokenizer_agree: int | None = None  # prompts the file's tokenizer encodes exactly as the original does
    from_original: list[str] = field(default_factory=list)  # config fields transformers cannot read from a GGUF
    skipped: str | None = None  # why the check could not run


def check_prompts(spec: str, count: int) -> tuple[list[list[dict]], str]:
    """Up to `count` chat prompts for the check: a run's held-out rows (data.test, else data.eval), else built-ins."""
    from tunesmith.data.examples import load_eval_examples

    path = Path(spec).expanduser()
    if is_run_dir(path):
        data = run_config(path).get("data") or {}
        for key in ("test", "eval"):
            source = data.get(key)
            if source:
                try:
                    examples = load_eval_examples(str(source), data.get("split") or "train")
                except TunesmithError as exc:
                    log.warning("export check: the run's data.%s cannot be read (%s); using built-in prompts", key, exc)
                    break
                if examples:
                    return [e.messages for e in examples[:count]], f"the run's data.{key} ({source})"
    return [[{"role": "user", "content": p}] for p in BUILTIN_PROMPTS[:count]], "built-in prompts"


def reload_gguf(path: Path, original: PretrainedConfig, arch: Architecture):
    """(model, tokenizer, fields taken from the original config) read back with transformers' GGUF loader."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type == "mistral":  # transformers' reading of a llama file whose general.name is "mistral"
        from transformers import LlamaConfig

        config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    taken = []
    for key in arch.unread:
        mine, theirs = getattr(config, key, None), getattr(original, key, None)
        if theirs is not None and mine != theirs:
            setattr(config, key, theirs)
            taken.append(key)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.hf_quantizer = None  # the weights are dequantised already
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer, taken


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_gguf(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               prompts: list[list[dict]], arch: Architecture,
               max_new_tokens: int = CHECK_MAX_NEW_TOKENS) -> CheckResult:
    """Greedy answers of the original and of the file read back, compared token for token on `prompts`."""
    from tunesmith.model.generate import prompt_ids

    try:
        reloaded, file_tokenizer, taken = reload_gguf(path, model.config, arch)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckResult(len(prompts), 0, skipped=f"transformers could not read the file back: {reason}")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=8)
    device = next(model.parameters()).device
    reloaded = reloaded.to(device)
    try:
        same_ids = sum(a == b for a, b in zip(prompt_ids(tokenizer, prompts), prompt_ids(file_tokenizer, prompts)))
        want = generate(model, tokenizer, prompts, settings, desc="original")
        got = generate(reloaded, file_tokenizer, prompts, settings, desc="from GGUF")
    finally:
        del reloaded
    result = CheckResult(len(prompts), 0, tokenizer_agree=same_ids, from_original=taken)
    for conversation, w, g in zip(prompts, want, got):
        same = next((i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids)) if a != b),
                    min(len(w.token_ids), len(g.token_ids)))
        result.tokens += len(w.token_ids)
        result.matched += same
        if w.token_ids == g.token_ids:
            result.agree += 1
        elif result.first_difference is None:
            prompt = next(m["content"] for m in reversed(conversation) if m["role"] == "user")
            head = "" if same == 0 else f"after {same} equal tokens, "
            mine = _short(tokenizer.decode(w.token_ids[same:], skip_special_tokens=True), 50) or "(the end)"
            theirs = _short(file_tokenizer.decode(g.token_ids[same:], skip_special_tokens=True), 50) or "(the end)"
            result.first_difference = f"{_short(prompt, 60)!r}: {head}original {mine!r}, from the file {theirs!r}"
    return result


# ---------------------------------------------------------------- export


@dataclass
class ExportReport:
    """What an export wrote and how the file compared with the original."""

    source: str
    gguf: Path | None = None
    quant: str | None = None
    size_bytes: int = 0
    tensors: int = 0
    f16_fallback: int = 0  # tensors whose rows are not whole quantisation blocks, written as f16
    modelfile: Path | None = None
    modelfile_template: bool = False
    lora_gguf: Path | None = None
    lora_tensors: int = 0
    check: CheckResult | None = None
    check_source: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing lines: what was written where, and the check."""
        lines = [f"export of {self.source} done in {self.seconds:.1f} s; wrote:"]
        if self.gguf is not None:
            extra = f", {self.f16_fallback} as f16 (rows not whole blocks)" if self.f16_fallback else ""
            lines.append(f"  gguf       {self.gguf}  ({self.quant}, {self.size_bytes / 2**20:,.1f} MiB, "
                         f"{self.tensors} tensors{extra})")
        if self.modelfile is not None:
            how = "TEMPLATE, stop tokens" if self.modelfile_template else "stop tokens; template left to the GGUF"
            lines.append(f"  Modelfile  {self.modelfile}  ({how}): ollama create NAME -f {self.modelfile}")
        if self.lora_gguf is not None:
            lines.append(f"  lora gguf  {self.lora_gguf}  ({self.lora_tensors} tensors): llama-cli -m BASE.gguf "
                         f"--lora {self.lora_gguf}")
        c = self.check
        if c is None and self.gguf is not None:
            lines.append("check: off (--no-check)")
        elif c is not None and c.skipped:
            lines.append(f"check: skipped at {self.quant}: {c.skipped}")
        elif c is not None:
            lines.append(f"check: {c.agree}/{c.prompts} prompts give the same greedy tokens from the file as from the "
                         f"original ({self.quant}; {self.check_source}; read back with transformers); "
                         f"{c.matched}/{c.tokens} tokens the same before the first difference")
            if c.tokenizer_agree is not None and c.tokenizer_agree != c.prompts:
                lines.append(f"  the file's tokenizer encodes {c.tokenizer_agree}/{c.prompts} prompts as the original")
            if c.first_difference:
                lines.append(f"  first difference: {c.first_difference}")
            if c.from_original:
                lines.append(f"  taken from the original config (transformers' GGUF reader skips them): "
                             f"{', '.join(c.from_original)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _source_name(spec: str) -> str:
    if spec == "default":
        return "SmolLM2-135M-Instruct"
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve().name
    return spec.rsplit("/", 1)[-1]


def load_source(spec: str, load: LoadConfig, device: torch.device | None = None):
    """(model in float32, eval mode; tokenizer) of a run folder, HF folder, hub id, .gguf or 'default'."""
    path = Path(spec).expanduser()
    if is_run_dir(path):
        model, tokenizer = load_run(path, spec, load, device)
    else:
        resolved = resolve_model(spec, load)
        model, tokenizer = load_model(resolved, load, device), load_tokenizer(resolved, load)
    return model.eval(), tokenizer


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, quant: str, *,
               name: str, check: Callable[[Path], CheckResult | None] | None = None) -> ExportReport:
    """Write `model` to `out` at `quant` (atomically), and the Modelfile beside it; `check` runs on the file first."""
    import gguf

    if quant not in QUANTS:
        raise TunesmithError(f"export: quant {quant!r} is not one of {', '.join(QUANTS)}")
    config = model.config
    arch = architecture_of(config)
    problems = _architecture_problems(config, arch)
    if problems:
        raise TunesmithError(f"export: this {config.model_type} model cannot be written faithfully for llama.cpp:",
                             problems=problems)
    stops = stop_token_ids(model, tokenizer)
    vocab = build_vocab(tokenizer, config.vocab_size, stops)
    state = model.state_dict()
    tensors = plan_tensors(state, config, arch, quant)
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    _add_metadata(writer, config, arch, _file_type(quant), name)
    _add_vocab(writer, vocab)
    report = ExportReport(source=name, gguf=out, quant=quant, tensors=len(tensors))
    report.f16_fallback = sum(t.qtype == gguf.GGMLQuantizationType.F16 for t in tensors) if quant not in ("f32", "f16") \
        else 0
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        report.notes.append(f"mistral sliding_window={config.sliding_window}: llama.cpp's llama architecture attends "
                            "to the whole context, so answers may differ past that many tokens")
    _make_parent(out)
    with _temp_beside(out) as tmp:
        _write(writer, tmp, tensors, desc=f"writing {out.name}")
        report.check = check(tmp) if check is not None else None
        c = report.check
        if c is not None and not c.skipped and quant == "f32" and c.agree < c.prompts:
            raise TunesmithError(
                f"export check failed: at f32 the file must give the same greedy tokens as the original on every "
                f"prompt, but {c.prompts - c.agree} of {c.prompts} differ; first: {c.first_difference}. Nothing was "
                f"written to {out}"
            )
        report.size_bytes = tmp.stat().st_size
        _publish(tmp, out)
    stop_texts = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stops)]
    text, report.modelfile_template = modelfile_text(out.name, tokenizer, [t for t in stop_texts if t], vocab.add_bos)
    report.modelfile = out.parent / MODELFILE
    _write_text_atomically(report.modelfile, text)
    return report


def export(spec: str, *, gguf: str | Path | None = None, quant: str = "q8_0", lora_gguf: str | Path | None = None,
           load: LoadConfig | None = None, check: bool = True, prompts: int = 4) -> ExportReport:
    """Export `spec` (run folder, HF folder, hub id, .gguf, 'default') to GGUF and/or its LoRA adapter to a GGUF adapter."""
    started = time.time()
    if gguf is None and lora_gguf is None:
        raise TunesmithError("export: nothing to write; give --gguf OUT.gguf and/or --lora-gguf OUT.gguf")
    if quant not in QUANTS:
        raise TunesmithError(f"export: --quant {quant!r} is not one of {', '.join(QUANTS)}")
    if prompts < 1:
        raise TunesmithError(f"export: --check-prompts must be at least 1, got {prompts}")
    out = check_out_path(gguf, "--gguf") if gguf is not None else None
    lora_out = check_out_path(lora_gguf, "--lora-gguf") if lora_gguf is not None else None
    if out is not None and out == lora_out:
        raise TunesmithError("export: --gguf and --lora-gguf name the same file; give two names")
    # float32 weights; eager attention on both sides of the check (every architecture has it, Gemma 2 needs it)
    load = dataclasses.replace(load or LoadConfig(), dtype="float32", attn_implementation="eager")
    report = ExportReport(source=spec)
    if lora_out is not None:
        report.lora_gguf, report.lora_tensors = lora_out, export_lora(spec, lora_out, load)
    if out is not None:
        model, tokenizer = load_source(spec, load)
        arch = architecture_of(model.config)
        conversations, where = check_prompts(spec, prompts)

        def run_check(path: Path) -> CheckResult:
            return check_gguf(path, model, tokenizer, conversations, arch)

        written = write_gguf(model, tokenizer, out, quant, name=_source_name(spec), check=run_check if check else None)
        written.lora_gguf, written.lora_tensors = report.lora_gguf, report.lora_tensors
        written.check_source = where
        written.source = spec
        if written.check is not None and written.check.skipped:
            written.notes.append(f"transformers could not read this {quant} file back, so it was not compared; "
                                 "run it with llama.cpp to check it")
        report = written
    report.seconds = time.time() - started
    return report


# ---------------------------------------------------------------- LoRA adapters


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: the first pattern that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def export_lora(spec: str, out: Path, load: LoadConfig) -> int:
    """Write a LoRA run's adapter/ alone as a GGUF LoRA adapter for its base model; returns the tensor count."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    run = Path(spec).expanduser()
    adapter = run / "adapter"
    if not is_run_dir(run) or not (adapter / "adapter_config.json").is_file():
        raise TunesmithError(f"--lora-gguf: {spec!r} is not a LoRA run folder (one with config.yaml and adapter/); "
                             "give the folder of a run trained with lora")
    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("peft_type", "LORA") != "LORA" or settings.get("use_dora"):
        raise TunesmithError("--lora-gguf: only plain LoRA adapters can be written for llama.cpp (this one is "
                             f"{'DoRA' if settings.get('use_dora') else settings.get('peft_type')}); use --gguf")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise TunesmithError(f"--lora-gguf: {weights} is missing; the run's adapter is incomplete")
    base_spec = run_base_spec(run, spec)
    config = AutoConfig.from_pretrained(resolve_model(base_spec, load).path, trust_remote_code=load.trust_remote_code)
    arch = architecture_of(config)
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    state = load_file(str(weights))
    alpha, r = float(settings.get("lora_alpha", 8)), int(settings.get("r", 8))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$", key)
        if not found:
            raise TunesmithError(f"--lora-gguf: adapter tensor {key!r} is not a LoRA A or B matrix (embedding "
                                 "adapters, biases and extra saved modules cannot go into a llama.cpp adapter); use --gguf")
        pairs.setdefault(found.group(1), {})[found.group(2)] = tensor
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    planned = []
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise TunesmithError(f"--lora-gguf: {module} has only lora_{next(iter(ab))}; the adapter is damaged")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise TunesmithError(f"--lora-gguf: adapted layer {module!r} has no llama.cpp name; use --gguf")
        rank = int(_pattern_value(settings.get("rank_pattern") or {}, module, r))
        layer_alpha = float(_pattern_value(settings.get("alpha_pattern") or {}, module, alpha))
        scaling = layer_alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)
        factor = scaling * rank / alpha if alpha else scaling  # llama.cpp scales by alpha / rank (1 when alpha = 0)

        def make_b(ab: dict = ab, module: str = module, factor: float = factor) -> torch.Tensor:
            b = ab["B"].to(torch.float32) * factor
            if arch.permute_qk and module.endswith("q_proj"):
                b = _permute_rotary(b, n_head)
            elif arch.permute_qk and module.endswith("k_proj"):
                b = _permute_rotary(b, n_kv)
            return b

        a = ab["A"]
        planned.append(PlannedTensor(name + ".lora_a", tuple(a.shape), gguf.GGMLQuantizationType.F32,
                                     lambda a=a: a.to(torch.float32)))
        planned.append(PlannedTensor(name + ".lora_b", tuple(ab["B"].shape), gguf.GGMLQuantizationType.F32, make_b))
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{_source_name(spec)} LoRA")
    _make_parent(out)
    with _temp_beside(out) as tmp:
        _write(writer, tmp, planned, desc=f"writing {out.name}")
        _publish(tmp, out)
    return len(planned)
