"""Writing final outputs: a LoRA adapter (PEFT format), the adapter merged into its base, or a full model.

Every output folder is written into a temporary sibling folder, fsynced, then renamed into place, so an
interrupted save never leaves a half-written folder under the final name. A write that fails for lack of space
removes its temporary folder and raises one `DiskFullError` naming the path and the free space.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import DiskFullError, TunesmithError
from tunesmith.model.lora import merged_state_dict

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# ---------------------------------------------------------------- a full disk

_FULL_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file-size limit (ulimit -f) is reached"}
# Writers in C++ and Rust (torch.save to a path, safetensors) report the OS error in their message only.
_FULL_TEXTS = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "os error 122": errno.EDQUOT, "File too large": errno.EFBIG, "os error 27": errno.EFBIG}


def disk_full_reason(exc: BaseException) -> str | None:
    """Why `exc` (or an exception it was raised from) means the disk is full; None when it is something else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return current.reason
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[current.errno]
        text = str(current)
        for needle, code in _FULL_TEXTS.items():
            if needle in text:
                return _FULL_ERRNOS[code]
        current = current.__cause__ or current.__context__
    return None


def format_bytes(n: float) -> str:
    """`n` bytes as a short human figure: 512 B, 12.0 KiB, 3.4 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path: str | Path) -> str:
    """The free space of the filesystem holding `path` (or its nearest existing parent), e.g. '12.0 KiB of 16.0 MiB'."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "an unknown amount"
    return f"{format_bytes(usage.free)} of {format_bytes(usage.total)}"


def disk_full_error(exc: BaseException, path: str | Path, what: str, advice: str = "") -> DiskFullError | None:
    """The one clear error for a write of `what` at `path` that failed with a full disk; None for other failures."""
    reason = disk_full_reason(exc)
    if reason is None:
        return None
    message = f"could not write {what} {path}: {reason} ({free_space(path)} free on its filesystem)"
    return DiskFullError(message + (f"; {advice}" if advice else ""), reason=reason)


def write_file(path: str | Path, text: str, what: str, advice: str = "") -> Path:
    """Write `text` to `path` through a temporary file and a rename: the old file or the whole new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(exc, path, what, advice)
        if full is not None:
            raise full from None
        raise
    return path


# ---------------------------------------------------------------- atomic folders


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders themselves, to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
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
    fsync_dir(dst.parent)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `parent/prefix<random>`, with the umask's permissions (mkdtemp's are owner-only)."""
    while True:
        tmp = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


RESUME_ADVICE = "free some space, then run the same train command again: it resumes from the last checkpoint"


@contextmanager
def atomic_dir(out_dir: str | Path, what: str = "the output folder", advice: str = RESUME_ADVICE) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success it replaces `out_dir`, on error it is removed.

    A failure for lack of space raises one `DiskFullError` naming `out_dir` and the free space.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output {str(out)!r} exists and is a file; give a folder path, or remove the file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(exc, out, what, advice)
        if full is not None:
            raise full from None
        raise


@contextmanager
def atomic_files(out_dir: str | Path, what: str, advice: str = "free some space and run the command again") -> Iterator[Path]:
    """Yield a temporary folder inside `out_dir`; on success each file in it replaces its namesake in `out_dir`.

    For folders that hold other things too (a report beside the files a run keeps there). Each file appears whole,
    and when any write fails (a full disk: one `DiskFullError`) none of the new files appears and the old ones stay.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output {str(out)!r} exists and is a file; give a folder path, or remove the file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out, ".tmp-")
    except OSError as exc:
        full = disk_full_error(exc, out, what, advice)
        if full is not None:
            raise full from None
        raise
    try:
        yield tmp
        fsync_tree(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)  # a rename needs no new space
        fsync_dir(out)
    except BaseException as exc:
        full = disk_full_error(exc, out, what, advice)
        if full is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _saved_with_cache_on(model: PreTrainedModel) -> Iterator[None]:
    # Training turns the KV cache off; a saved model is for inference, where it should be on.
    before = model.config.use_cache
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = before


@contextmanager
def _saved_unquantized(model: PreTrainedModel) -> Iterator[None]:
    # A merged state dict of a quantized base is de-quantized already; without this transformers would save the
    # model as (and reload it as) a bitsandbytes model, quantization_config and all.
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    if quantizer is None and config is None:
        yield
        return
    model.hf_quantizer = None
    if config is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


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
    peak extra memory is about one CPU copy of the adapted layers. A quantized base (`load.quantize`) is saved
    de-quantized in that dtype, with no quantization config: a plain model that loads without bitsandbytes.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_merged needs a PeftModel (from apply_lora), got {type(model).__name__}; use save_full")
    state_dict = merged_state_dict(model)
    base = model.get_base_model()
    with atomic_dir(out_dir) as tmp, _saved_with_cache_on(base), _saved_unquantized(base):
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
