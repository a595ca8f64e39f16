"""The `tunesmith` command."""

from __future__ import annotations

import argparse
import os
import sys

from tunesmith.config import apply_overrides
from tunesmith.errors import RunStopped, TunesmithError


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) out of the user's console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


NO_TRAIN_DATA = (
    "train: nothing to train on; give a YAML config file (see configs/) or at least the training data, e.g. "
    "`tunesmith train data.train=my.jsonl`; every other setting has a default (`tunesmith config` lists them)"
)


def train_arguments(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """Split `tunesmith train`'s arguments into the YAML path (None when there is none) and the overrides.

    The YAML file is optional: a first argument containing `=` is an override, not a path.
    """
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    for item in overrides:
        if "=" not in item:
            raise TunesmithError(f"train: {item!r} is not a key=value override; a YAML config file can only come "
                                 "first, before the overrides")
    if config is None:
        data = apply_overrides({}, overrides).get("data")
        if not (isinstance(data, dict) and data.get("train")):
            raise TunesmithError(NO_TRAIN_DATA)
    return config, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    config, overrides = train_arguments(args.config, args.overrides)
    from tunesmith.run import train

    train(config if config is not None else {}, overrides)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from tunesmith.config_docs import reference_markdown, reference_text

    print(reference_markdown(args.section) if args.markdown else reference_text(args.section), end="")
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from tunesmith.serve import serve

    serve(args.models, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          threads=args.threads)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from tunesmith.ui.app import ui

    ui(args.runs, host=args.host, port=args.port, token=args.token)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith.chat import ChatSettings, chat

    settings = ChatSettings(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    return chat(args.model, compare=args.compare, system=args.system, settings=settings)


def _cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.eval.evaluate import run_eval_command

    return run_eval_command(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from tunesmith.config import LoadConfig
    from tunesmith.model.gguf_export import export

    targets = " and ".join(f"{flag} {path}" for flag, path in (("--gguf", args.gguf), ("--lora-gguf", args.lora_gguf)) if path)
    print(f"tunesmith export: {args.model} -> {targets or 'nothing'}" + (f" ({args.quant})" if args.gguf else ""),
          flush=True)
    report = export(args.model, gguf=args.gguf, quant=args.quant, lora_gguf=args.lora_gguf,
                    load=LoadConfig(trust_remote_code=args.trust_remote_code), check=not args.no_check,
                    prompts=args.check_prompts)
    print(report.summary(), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune a pretrained causal language model for one use, and prove it worked.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="fine-tune a model from a YAML config and/or key=value settings")
    p_train.add_argument("config", nargs="?", help="YAML config file (see configs/); optional: without it every "
                         "key not overridden has its default (`tunesmith config`)")
    p_train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.train=my.jsonl "
                         "train.lr=1e-4 lora=null")
    p_train.set_defaults(func=_cmd_train)

    p_config = sub.add_parser("config", help="every config key with its type, default and meaning")
    p_config.add_argument("section", nargs="?", help="one section only (top, data, lora, train, ...)")
    p_config.add_argument("--markdown", action="store_true", help="print markdown, as in docs/config.md")
    p_config.set_defaults(func=_cmd_config, loads_models=False)

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

    from tunesmith.eval import compare  # light at import time: torch loads only when it runs

    p_compare = sub.add_parser("compare", help="evaluate base and tuned models on the same rows; HTML report")
    compare.add_arguments(p_compare)

    from tunesmith.eval import score

    p_score = sub.add_parser("score", help="score rows or preference pairs with a trained reward model")
    score.add_arguments(p_score)

    p_chat = sub.add_parser("chat", help="talk to a model or run in the terminal (tokens stream as they come)")
    p_chat.add_argument("model", metavar="MODEL_OR_RUN", help="a run folder, model folder, hub id, .gguf or 'default'")
    p_chat.add_argument("--compare", metavar="OTHER", help="answer every message with this model too, e.g. the base")
    p_chat.add_argument("--system", metavar="TEXT", help="system prompt")
    p_chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p_chat.add_argument("--top-p", type=float, default=1.0)
    p_chat.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p_chat.add_argument("--seed", type=int, help="sample reproducibly")
    p_chat.set_defaults(func=_cmd_chat)

    p_serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for models and runs")
    p_serve.add_argument("models", nargs="+", metavar="MODEL_OR_RUN",
                         help="what to serve, each MODEL_OR_RUN or NAME=MODEL_OR_RUN (a run is named after its "
                              "folder); LoRA runs of one base share its weights")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every request")
    p_serve.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
    p_serve.add_argument("--threads", type=int, metavar="N", help="CPU threads for decoding (default: every core); "
                         "on a machine busy with other work, fewer avoid slowing every request")
    p_serve.set_defaults(func=_cmd_serve)

    p_ui = sub.add_parser("ui", help="a local web page: start runs, watch them learn, compare and chat with models")
    p_ui.add_argument("--runs", default="runs", metavar="DIR", help="the folder of run folders it lists and starts "
                      "runs in (default ./runs)")
    p_ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p_ui.add_argument("--port", type=int, default=7860)
    p_ui.add_argument("--token", help="require this token on every request (one is made up when --host is not "
                      "this machine's and none is given); open the printed address, which carries it")
    p_ui.set_defaults(func=_cmd_ui)

    p_eval = sub.add_parser("eval", help="generate answers on a data file, score them, measure perplexity")
    p_eval.add_argument("--model", required=True, help="model folder, hub id, .gguf, 'default', or a tunesmith run folder")
    p_eval.add_argument("--data", required=True, help="rows with prompts (and reference answers): any sft data format")
    p_eval.add_argument("--metrics", nargs="*", metavar="METRIC", help="exact_match, contains, json_equal, "
                        "json_in_output_match, or module:function (default: exact_match contains when every row "
                        "has a reference; given with no names: generate only)")
    p_eval.add_argument("--out", help="folder for results.json (default: ./eval-<model name>)")
    p_eval.add_argument("--label", help="name of this model in tables (default: the model name)")
    p_eval.add_argument("--max-new-tokens", type=int, default=128)
    p_eval.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p_eval.add_argument("--top-p", type=float, default=1.0)
    p_eval.add_argument("--top-k", type=int, default=0, help="0 = off")
    p_eval.add_argument("--stop", nargs="+", metavar="TEXT",
                        help="end an answer where it contains one of these (a newline, in bash: --stop $'\\n')")
    p_eval.add_argument("--batch-size", type=int, default=16)
    p_eval.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p_eval.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p_eval.add_argument("--no-perplexity", action="store_true", help="skip the perplexity of reference answers")
    p_eval.add_argument("--no-generate", action="store_true", help="perplexity only: no answers, no metrics")
    p_eval.add_argument("--text", metavar="FILE", help="held-out plain text (field 'text', or .txt): also measure the "
                        "model's perplexity on it, per document, as pretraining tokenizes it")
    p_eval.add_argument("--split", default="train", help="split of an HF dataset")
    p_eval.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p_eval.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model")
    p_eval.set_defaults(func=_cmd_eval)

    p_export = sub.add_parser("export", help="write a model or run as GGUF (llama.cpp, Ollama, LM Studio), checked "
                              "against the original")
    p_export.add_argument("model", help="a tunesmith run folder, model folder, hub id, .gguf, or 'default'")
    p_export.add_argument("--gguf", metavar="OUT.gguf", help="the GGUF file to write (an Ollama Modelfile is "
                          "written next to it)")
    p_export.add_argument("--quant", default="q8_0", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                          help="precision of the weights (default q8_0; q4_0 keeps the embedding at q8_0)")
    p_export.add_argument("--lora-gguf", metavar="OUT.gguf", help="write a LoRA run's adapter alone as a GGUF LoRA "
                          "adapter (llama.cpp --lora)")
    p_export.add_argument("--no-check", action="store_true", help="skip reading the file back and comparing answers")
    p_export.add_argument("--check-prompts", type=int, default=4, metavar="N",
                          help="prompts the check compares (the run's held-out rows, else built-in ones)")
    p_export.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model")
    p_export.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunesmith` command; exit code 2 on bad input, with one clear message; 0 (SIGTERM) or
    130 (SIGINT) when a signal stopped a run after its checkpoint."""
    args = build_parser().parse_args(argv)
    if getattr(args, "loads_models", True):
        quiet_libraries()
    try:
        return args.func(args)
    except RunStopped as exc:  # a signal: checkpoint written, resumable; 0 after SIGTERM, 130 after SIGINT
        if str(exc):
            print(f"tunesmith: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except TunesmithError as exc:
        print(f"tunesmith: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tunesmith: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
