"""The `tunesmith` command."""

from __future__ import annotations

import argparse
import os
import sys

from tunesmith.errors import TunesmithError


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) out of the user's console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.core.run import train

    train(args.config, args.overrides)
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from tunesmith.config import LoadConfig
    from tunesmith.data import inspect_data

    tokenizer = None
    if args.model:
        from tunesmith.model import load_tokenizer, resolve_model

        load = LoadConfig(trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(resolve_model(args.model, load), load)
    print(inspect_data(args.file, tokenizer, max_length=args.max_length, format=args.format, split=args.split))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune a pretrained causal language model for one use, and prove it worked.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="fine-tune a model from a YAML config")
    p_train.add_argument("config", help="YAML config file (see configs/)")
    p_train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4 lora=null")
    p_train.set_defaults(func=_cmd_train)

    p_data = sub.add_parser("data", help="look at a dataset before training on it")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_inspect = data_sub.add_parser("inspect", help="format, size, token lengths and a rendered example")
    p_inspect.add_argument("file", help="data file (.jsonl/.json/.csv/.parquet) or HF dataset folder or name")
    p_inspect.add_argument("--model", help="model whose tokenizer and chat template to use (e.g. default)")
    p_inspect.add_argument("--max-length", type=int, default=1024, help="row length to count truncation against")
    p_inspect.add_argument("--format", default="auto", help="force a format instead of detecting it")
    p_inspect.add_argument("--split", default="train", help="split of an HF dataset")
    p_inspect.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model")
    p_inspect.set_defaults(func=_cmd_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunesmith` command; exit code 2 on bad input, with one clear message."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except TunesmithError as exc:
        print(f"tunesmith: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tunesmith: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
