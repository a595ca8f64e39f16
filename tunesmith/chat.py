"""`tunesmith chat`: talk to a tuned model in the terminal, tokens streaming as they are decoded.

Multi-turn with the model's chat template; `--compare OTHER` answers every message with both models, one
after the other, each under its name: the base-versus-tuned comparison, live. A model without a chat template
continues each message as plain text. Both models run on the continuous-batching engine `serve` uses (LoRA
runs of one base share its weights).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from tunesmith.errors import TunesmithError

HELP = """commands:
  /reset               forget the conversation (the system prompt stays)
  /system TEXT         set the system prompt (and reset); /system alone removes it
  /temperature X       0 = greedy; e.g. 0.7
  /top_p X             nucleus sampling, in (0, 1]
  /max_tokens N        longest answer, in tokens
  /seed N              sample reproducibly from now on (/seed alone: at random again)
  /settings            show the settings
  /quit                leave (Ctrl-D too)"""


@dataclass
class ChatSettings:
    """What every answer is generated with; changed by the slash commands."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def generation(self):
        """The GenerationSettings of the next answer."""
        from tunesmith.model.generate import GenerationSettings

        return GenerationSettings(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  seed=self.seed if self.seed is not None else random.getrandbits(62))


@dataclass
class Conversation:
    """One model's side of the chat: its messages so far."""

    served: object  # tunesmith.serve.Served
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for the user's new message: the whole chat rendered, or the message as plain text."""
        from tunesmith.serve import chat_prompt_ids, text_prompt_ids

        if not self.served.has_chat_template:
            return text_prompt_ids(self.served, text)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return chat_prompt_ids(self.served, head + self.messages + [{"role": "user", "content": text}])


class Chat:
    """The chat loop, reading lines from `read` and writing to `out` (a terminal, or a script in tests)."""

    def __init__(self, served: list, *, system: str | None = None, settings: ChatSettings | None = None,
                 out: TextIO = sys.stdout, read: Callable[[str], str] = input) -> None:
        self.sides = [Conversation(s, system) for s in served]
        self.settings = settings or ChatSettings()
        self.out = out
        self.read = read

    def write(self, text: str) -> None:
        """Write and flush at once: tokens appear as they are decoded."""
        self.out.write(text)
        self.out.flush()

    def run(self) -> int:
        """Read messages until /quit or end of input; returns the exit code."""
        names = " and ".join(side.served.name for side in self.sides)
        self.write(f"chatting with {names}; /help for commands, /quit to leave\n")
        for side in self.sides:
            if not side.served.has_chat_template:
                self.write(f"note: {side.served.name} has no chat template, so each message is continued as "
                           "plain text (no conversation history)\n")
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                return 130
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
                continue
            self.answer(line)

    def answer(self, text: str) -> None:
        """Every model's answer to the message, streamed, each under its name when comparing."""
        settings = self.settings.generation()
        for side in self.sides:
            try:
                ids = side.prompt_ids(text)
            except Exception as exc:  # a prompt the model cannot take: say why, keep chatting
                self.write(f"[{side.served.name}] cannot answer: {getattr(exc, 'message', exc)}\n")
                continue
            if len(self.sides) > 1:
                self.write(f"[{side.served.name}] ")
            request = None
            try:
                request = side.served.engine.submit(ids, settings, adapter=side.served.adapter, on_text=self.write)
                generation = request.wait()
            except KeyboardInterrupt:
                if request is not None:
                    request.cancel()
                self.write("\n(stopped)\n")
                return
            except TunesmithError as exc:
                self.write(f"\n[{side.served.name}] cannot answer: {exc}\n")
                continue
            ending = {"length": f" [cut at max_tokens={settings.max_new_tokens}]"}.get(generation.finish_reason, "")
            self.write(f"{ending}\n")
            if side.served.has_chat_template:
                side.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": generation.text}]

    def command(self, line: str) -> str | None:
        """Apply a slash command; returns "quit" to leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        s = self.settings
        try:
            if name in ("quit", "exit", "q"):
                return "quit"
            if name == "help":
                self.write(HELP + "\n")
            elif name == "reset":
                for side in self.sides:
                    side.messages = []
                self.write("(conversation reset)\n")
            elif name == "system":
                for side in self.sides:
                    side.system, side.messages = arg or None, []
                self.write(f"(system prompt {'set' if arg else 'removed'}; conversation reset)\n")
            elif name == "temperature":
                s.temperature = _value(arg, float, 0.0, 2.0, name)
            elif name in ("top_p", "top-p"):
                s.top_p = _value(arg, float, 1e-6, 1.0, name)
            elif name in ("max_tokens", "max-tokens"):
                s.max_tokens = int(_value(arg, int, 1, 1 << 20, name))
            elif name == "seed":
                s.seed = int(_value(arg, int, 0, 2**62, name)) if arg else None
            elif name != "settings":
                self.write(f"unknown command /{name}; /help lists them\n")
                return None
            if name in ("temperature", "top_p", "top-p", "max_tokens", "max-tokens", "seed", "settings"):
                seed = "random" if s.seed is None else s.seed
                self.write(f"(temperature {s.temperature}, top_p {s.top_p}, max_tokens {s.max_tokens}, seed {seed})\n")
        except ValueError as exc:
            self.write(f"{exc}\n")
        return None


def _value(text: str, kind: type, low: float, high: float, name: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"/{name} needs a {'whole ' if kind is int else ''}number, e.g. /{name} "
                         f"{'256' if kind is int else '0.7'}") from None
    if not low <= value <= high:
        raise ValueError(f"/{name}: {value} is outside {low}..{high}")
    return value


def chat(model: str, *, compare: str | None = None, system: str | None = None,
         settings: ChatSettings | None = None) -> int:
    """Load the model (and the one to compare with) and chat until /quit (the `tunesmith chat` command)."""
    from tunesmith.serve import load_models, stop_engines

    items: list[tuple[str | None, str]] = [(None, model)]
    if compare is not None:
        items.append((None, compare))
    print(f"loading {model}" + (f" and {compare}" if compare else "") + " ...", file=sys.stderr, flush=True)
    try:
        served = load_models(items)
    except TunesmithError as exc:
        if compare is not None and "two models would be served as" in str(exc):  # e.g. two runs both named sft
            served = load_models([(model, model), (compare, compare)])
        else:
            raise
    try:
        return Chat(list(served.values()), system=system, settings=settings).run()
    finally:
        stop_engines(served)
