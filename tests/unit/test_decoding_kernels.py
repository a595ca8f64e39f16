"""The private oneDNN ops generation runs on (model/decoding.py): a torch upgrade that drops or changes them must
fail here, not leave decoding silently a third slower."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import LoadConfig
from tunesmith.model import load_model, resolve_model
from tunesmith.model.decoding import can_pack, decoding_weights


def test_onednn_packed_linears_are_there_wherever_torch_has_onednn(tiny_model_dir: Path) -> None:
    assert torch.backends.mkldnn.is_available(), "this torch build has no oneDNN: CPU decoding runs unpacked"
    for op in ("_reorder_linear_weight", "_linear_pointwise"):
        assert hasattr(torch.ops.mkldnn, op), f"torch {torch.__version__} has no torch.ops.mkldnn.{op}"
    assert can_pack(), f"torch {torch.__version__}: oneDNN packed linears no longer give F.linear's results"
    model = load_model(resolve_model(str(tiny_model_dir), LoadConfig()), LoadConfig(), device=torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with decoding_weights(model) as how:
            packed = model(input_ids=ids).logits
    assert how == "packed"
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
