"""`tunesmith serve`: an OpenAI-compatible HTTP server for tuned models, on FastAPI + uvicorn.

Every model runs on a continuous-batching `Engine` (model/engine.py), so concurrent requests share decode
steps. LoRA runs of one base share one copy of the base weights: the base is loaded once, each run's adapter
is added to it under the run's name, and each request's rows compute their own adapter in the common batch.
A model named on its own that is that base joins the same engine.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with
`stream: true` as server-sent events). Errors have OpenAI's shape: {"error": {"message", "type", "param",
"code"}}, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from starlette.requests import Request  # at module level: FastAPI reads the routes' annotations from here

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError

MAX_N = 16  # completions one request may ask for


# ---------------------------------------------------------------- the models served


@dataclass
class Served:
    """One model name the server answers to."""

    name: str
    engine: Any  # tunesmith.model.engine.Engine
    adapter: str | None  # the adapter of this name inside its engine (None: the engine's model as it is)
    tokenizer: Any  # renders this model's prompts (its own chat template)
    spec: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def has_chat_template(self) -> bool:
        """Whether chat messages can be rendered with the model's own template."""
        from tunesmith.data.chat import has_chat_template

        return has_chat_template(self.tokenizer)


def parse_models(items: list[str]) -> list[tuple[str | None, str]]:
    """`MODEL_OR_RUN` or `NAME=MODEL_OR_RUN` arguments as (name or None, spec)."""
    out = []
    for item in items:
        name, sep, spec = item.partition("=")
        if sep and name and spec and "/" not in name:
            out.append((name, spec))
        else:
            out.append((None, item))
    return out


def distinct_engines(served: dict[str, Served]) -> list[Any]:
    """Each engine of `served` once: the LoRA runs of one base share their base's engine."""
    return list({id(s.engine): s.engine for s in served.values()}.values())


def stop_engines(served: dict[str, Served]) -> None:
    """Stop every engine of `served`, each once."""
    for engine in distinct_engines(served):
        engine.stop()


def load_models(items: list[tuple[str | None, str]], load: LoadConfig | None = None, *,
                max_batch: int = 32) -> dict[str, Served]:
    """Load every model once (a base shared by its LoRA runs) and start its engine; names must be unique."""
    from tunesmith.model.engine import Engine
    from tunesmith.model.loading import load_tokenizer
    from tunesmith.model.runs import (
        RunModel,
        apply_adapter,
        load_base,
        load_run_model,
        locate,
        tokenizer_source,
    )

    load = load or LoadConfig()
    located: list[tuple[str, RunModel]] = []
    for name, spec in items:
        run = locate(spec)
        located.append((name or run.name, run))
    names = [n for n, _ in located]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise TunesmithError(f"two models would be served as {', '.join(map(repr, doubled))}; name them apart with "
                             "NAME=MODEL_OR_RUN")

    # One engine per base: LoRA runs of the same base, and that base itself when served, share its weights.
    # A DoRA adapter gets an engine of its own: peft cannot choose DoRA adapters per row (`adapter_names`).
    adapted_bases = {run.base for _, run in located if run.adapter is not None and not _is_dora(run)}
    groups: dict[str, list[tuple[str, RunModel]]] = {}
    for name, run in located:
        shared = run.base in adapted_bases and not _is_dora(run)
        groups.setdefault(run.base if shared else f"{run.base}\0{name}", []).append((name, run))
    served: dict[str, Served] = {}
    for members in groups.values():
        first = members[0][1]
        adapted = [(n, r) for n, r in members if r.adapter is not None]
        if adapted:
            model = load_base(first, load)
            for n, r in adapted:
                model = apply_adapter(model, r, adapter_name=n)
        else:
            model, _, _ = load_run_model(first.spec, load)
        # One adapter served alone runs merged into the decoding weights; several are chosen per row.
        several = len(adapted) > 1 or len(adapted) < len(members)
        if adapted and not several:
            model.set_adapter(adapted[0][0])
        engine = Engine(model.eval(), load_tokenizer(tokenizer_source(first, load), load), max_batch=max_batch,
                        adapters=[n for n, _ in adapted] if several else None).start()
        for n, r in members:
            tokenizer = load_tokenizer(tokenizer_source(r, load), load)
            served[n] = Served(n, engine, n if (several and r.adapter is not None) else None, tokenizer, r.spec)
    return served


def _is_dora(run: Any) -> bool:
    """Whether a run's adapter is DoRA (its adapter_config.json says use_dora)."""
    if run.adapter is None:
        return False
    try:
        return bool(json.loads((Path(run.adapter) / "adapter_config.json").read_text(encoding="utf-8")).get("use_dora"))
    except (OSError, ValueError):
        return False  # peft reports a missing or broken adapter config when it loads the adapter


# ---------------------------------------------------------------- requests


class ApiError(Exception):
    """A request the server refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default: float, low: float, high: float, *, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"{key}: must be between {low} and {high}, got {value}", param=key)
    return value


def settings_of(body: dict) -> tuple[Any, int]:
    """The GenerationSettings a request asks for, and its n."""
    from tunesmith.model.generate import GenerationSettings

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = 16 if max_tokens is None and "prompt" in body else max_tokens  # /v1/completions' default
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, 1 << 20, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p: must be above 0 (1 keeps every token)", param="top_p")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed: expected an integer, got {seed!r}", param="seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop: expected a non-empty string or a list of up to 4 of them", param="stop")
    return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                              seed=seed if seed is not None else random.getrandbits(62)), n


def chat_messages(body: dict) -> list[dict[str, str]]:
    """The request's messages as {role, content} strings, ending in a user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"{where}: expected an object with role system, user or assistant", param=where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string, got {type(content).__name__}",
                           param=f"{where}.content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's (the model answers it)", param="messages")
    return out


def chat_prompt_ids(served: Served, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat, rendered as training renders it, ready for the answer."""
    from tunesmith.model.generate import prompt_ids

    try:
        return prompt_ids(served.tokenizer, [messages])[0]
    except TunesmithError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def text_prompt_ids(served: Served, prompt: str) -> list[int]:
    """Token ids of a plain-text prompt (BOS first, as training renders raw text)."""
    tok = served.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos + tok(prompt, add_special_tokens=False)["input_ids"]


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


# ---------------------------------------------------------------- the app


def create_app(served: dict[str, Served], *, api_key: str | None = None):
    """The FastAPI application serving `served`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @app.middleware("http")
    async def _check_key(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(ApiError(401, "missing or wrong API key: send the header "
                                                    "'Authorization: Bearer KEY' with the server's --api-key",
                                               kind="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def model_of(body: dict) -> Served:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"model: required; one of {', '.join(served)}", param="model")
        if name not in served:
            raise ApiError(404, f"model {name!r} does not exist; this server has {', '.join(served)}",
                           param="model", code="model_not_found")
        return served[name]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(served),
                "running": sum(e.num_running for e in distinct_engines(served))}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                            "owned_by": "tunesmith"} for s in served.values()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        model = model_of(body)
        ids = chat_prompt_ids(model, chat_messages(body))
        return await respond(request, body, model, [ids], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        model = model_of(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt: expected a string or a list of strings", param="prompt")
        return await respond(request, body, model, [text_prompt_ids(model, p) for p in prompts], chat=False)

    async def respond(request: Request, body: dict, model: Served, prompts: list[list[int]], *, chat: bool):
        settings, n = settings_of(body)
        for ids in prompts:
            try:
                model.engine.check(ids, settings, model.adapter)
            except TunesmithError as exc:
                raise ApiError(400, str(exc), param="max_tokens" if "max_tokens" in str(exc) else "messages"
                               if chat else "prompt") from None
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        job = _Job(model, prompts, settings, n, asyncio.get_running_loop(), stream=stream)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model.name}
        if not stream:
            try:
                results = await job.results()
            finally:
                job.cancel()
            choices = [_choice(i, g, chat) for i, g in enumerate(results)]
            return {**head, "choices": choices, "usage": job.usage(results)}
        return StreamingResponse(_events(job, head, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _choice(index: int, generation: Any, chat: bool) -> dict[str, Any]:
    reason = FINISH[generation.finish_reason]
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": generation.text}, "logprobs": None,
                "finish_reason": reason}
    return {"index": index, "text": generation.text, "logprobs": None, "finish_reason": reason}


class _Job:
    """The engine requests of one HTTP request (n per prompt), bridged to the server's event loop."""

    def __init__(self, model: Served, prompts: list[list[int]], settings: Any, n: int,
                 loop: asyncio.AbstractEventLoop, *, stream: bool) -> None:
        import dataclasses

        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.requests = []
        for p_index, ids in enumerate(prompts):
            for k in range(n):
                index = p_index * n + k
                own = dataclasses.replace(settings, seed=settings.seed + index, stop=list(settings.stop))
                on_text = (lambda text, i=index: self._put(("text", i, text))) if stream else None
                self.requests.append(model.engine.submit(ids, own, adapter=model.adapter, on_text=on_text,
                                                         on_done=lambda r, i=index: self._put(("done", i, r))))

    def _put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Free the batch rows of every request not yet finished (a client that went away)."""
        for request in self.requests:
            request.cancel()

    async def results(self) -> list[Any]:
        """Every Generation, in choice order; an engine failure becomes a 500."""
        pending = len(self.requests)
        while pending:
            kind, _, _ = await self.events.get()
            pending -= kind == "done"
        for request in self.requests:
            if request.error is not None:
                raise ApiError(500, f"generation failed: {request.error}", kind="server_error")
        return [r.result for r in self.requests]

    def usage(self, results: list[Any]) -> dict[str, int]:
        """OpenAI's usage block."""
        completion = sum(g.num_new_tokens for g in results)
        prompt = self.prompt_tokens  # each prompt once, however many choices it has (as OpenAI counts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _events(job: _Job, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed response; a client that disconnects cancels its rows."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: str | None, reason: str | None, *, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return "data: " + json.dumps({**head, "choices": [choice]}, ensure_ascii=False) + "\n\n"

    try:
        if chat:
            for i in range(len(job.requests)):
                yield chunk(i, None, None, first=True)
        pending = len(job.requests)
        while pending:
            kind, index, payload = await job.events.get()
            if kind == "text":
                yield chunk(index, payload, None)
                continue
            pending -= 1
            if payload.error is not None:
                err = {"error": {"message": f"generation failed: {payload.error}", "type": "server_error",
                                 "param": None, "code": None}}
                yield "data: " + json.dumps(err) + "\n\n"
                continue
            yield chunk(index, None, FINISH[payload.result.finish_reason])
        if include_usage:
            usage = job.usage([r.result for r in job.requests if r.result is not None])
            yield "data: " + json.dumps({**head, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


# ---------------------------------------------------------------- running it


class ServerThread:
    """A uvicorn server on a thread of this process (tests, the dashboard); `stop` ends it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="tunesmith-server", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving; returns once the socket accepts connections."""
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise TunesmithError("the server did not start (is the port in use?)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop accepting, finish, and join the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, threads: int | None = None) -> None:
    """Load the models and serve them until interrupted (the `tunesmith serve` command)."""
    import uvicorn

    if threads is not None:
        if threads < 1:
            raise TunesmithError(f"--threads {threads}: give at least 1 (CPU threads the decoder may use)")
        # on a machine shared with other work, fewer threads than cores avoid the spin-waits that slow every one
        torch.set_num_threads(threads)
    served = load_models(parse_models(models), max_batch=max_batch)
    app = create_app(served, api_key=api_key)
    url = f"http://{host}:{port}/v1"
    width = max(len(n) for n in served)
    device = next(iter(served.values())).engine.device
    where = f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}" \
        if device.type == "cpu" else str(device)
    lines = [f"serving {len(served)} model{'s' if len(served) > 1 else ''} at {url} (decoding on {where})"]
    for s in served.values():
        shared = sum(other.engine is s.engine for other in served.values())
        lines.append(f"  {s.name:<{width}}  {s.spec}" + (f"  (base weights shared by {shared} models)" if shared > 1 else ""))
    lines.append(f"try: curl {url}/chat/completions -H 'Content-Type: application/json' "
                 f"-d '{{\"model\": \"{next(iter(served))}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        lines.append("warning: bound beyond this machine without --api-key: anyone who reaches it can use it")
    print("\n".join(lines), flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stop_engines(served)
    print("server stopped", flush=True)


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` nobody listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

