"""Writing final outputs: a LoRA adapter (PEFT format), the adapter merged into its base, or a full model.

Every output folder is written into a temporary sibling folder, fsynced, then renamed into place, so an
interrupted save never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import TunesmithError
from tunesmith.model.lora import merged_state_dict

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# ---------------------------------------------------------------- atomic folders


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders themselves, to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst`; `dst` is never a mix of old and new."""
    if dst.exists():
        # A non-empty folder cannot be renamed over, so the old one steps aside first.
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `parent/prefix<random>`, with the umask's permissions (mkdtemp's are owner-only)."""
    while True:
        tmp = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success it replaces `out_dir`, on error it is removed."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output {str(out)!r} exists and is a file; give a folder path, or remove the file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _saved_with_cache_on(model: PreTrainedModel) -> Iterator[None]:
    # Training turns the KV cache off; a saved model is for inference, where it should be on.
    before = model.config.use_cache
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = before


# ---------------------------------------------------------------- outputs


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save the LoRA adapter in PEFT format (adapter_config.json, adapter_model.safetensors) plus the tokenizer."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel (from apply_lora), got {type(model).__name__}; use save_full")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def save_merged(model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save the base model with the LoRA update folded into its weights, as HF safetensors plus the tokenizer.

    `model` is left exactly as it was (`merged_state_dict` merges into copies of the adapted weights), so training
    or evaluation can go on with the adapter. The merged weights are gathered on the CPU, in the base model's dtype;
    peak extra memory is about one CPU copy of the adapted layers.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_merged needs a PeftModel (from apply_lora), got {type(model).__name__}; use save_full")
    state_dict = merged_state_dict(model)
    base = model.get_base_model()
    with atomic_dir(out_dir) as tmp, _saved_with_cache_on(base):
        base.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def save_full(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save a fully fine-tuned model as HF safetensors plus the tokenizer."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise TypeError("save_full got a PeftModel; use save_adapter and/or save_merged for LoRA runs")
    with atomic_dir(out_dir) as tmp, _saved_with_cache_on(model):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
