"""Build a randomly initialised model of a known shape, with a tokenizer trained here, for benchmarks that must
download nothing (the GPU bench runs on a machine that reaches no hub).

    python bench/make_model.py --shape qwen2.5-0.5b --out /tmp/qwen2.5-0.5b-shaped [--layers N]

The tokenizer is a byte-level BPE trained on CPython's `pydoc_data.topics` with a ChatML chat template; its
vocabulary is smaller than the model's (the extra embedding rows are simply never used), which changes nothing
about the cost of a training step: the layers, the head and the loss are the full size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Architecture numbers from the models' published config.json files.
SHAPES = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
    },
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
    },
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(out: Path, vocab_size: int = 16000) -> None:
    """A byte-level BPE on pydoc_data.topics with ChatML special tokens, saved as a transformers tokenizer."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def build(shape: str, out: Path, layers: int | None = None, seed: int = 0) -> Path:
    """Write a random model of `shape` (optionally fewer layers) and a trained tokenizer to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "shape.json").write_text(json.dumps({"shape": shape, "params": params, **spec}, indent=1))
    return out


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (for a quick check)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = build(args.shape, Path(args.out), args.layers, args.seed)
    print(json.dumps({"model": str(out), **json.loads((out / "shape.json").read_text())}))


if __name__ == "__main__":
    main()
