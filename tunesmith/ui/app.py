"""`tunesmith ui`: one local web page to start runs, watch them learn, and compare and chat with their models.

The page (static/index.html, app.js, style.css and the vendored uPlot) talks to this FastAPI app:

- GET  /api/runs, /api/events/runs        the runs table, and the same as server-sent events when it changes
- GET  /api/runs/NAME, /api/events/run/NAME  one run: its config, status, progress; events carry each new line
                                            of metrics.jsonl as it is written, the status and RL samples
- GET  /api/runs/NAME/files/PATH           a file of the run folder (its report); a path that escapes: 403
- POST /api/runs/NAME/stop, .../resume     SIGTERM to its train (a checkpoint, then exit), `tunesmith train` again
- GET  /api/schema; POST /api/check, /api/start, /api/inspect   the new-run form
- POST /api/models; /serve/v1/...          chat: models loaded by `serve.load_models`, answered by `serve`'s app
- POST /api/compare; GET /api/jobs         `tunesmith compare` on a data file, and the commands launched

Trains and comparisons run as their own processes (`ui.jobs`). Bound beyond this machine, every request needs the
token (`--token`, else one is made up and printed).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request  # at module level: FastAPI reads the routes' annotations from here

from tunesmith.errors import TunesmithError
from tunesmith.model.lock import holder
from tunesmith.model.runs import is_run_dir
from tunesmith.ui import forms, jobs
from tunesmith.ui.runs import Forbidden, inside, latest_samples, list_runs, run_job, run_row

STATIC = Path(__file__).parent / "static"
LOCAL = ("127.0.0.1", "localhost", "::1")
METRICS_POLL_S = 0.05  # how often a run's page stream looks for new metric lines
STATUS_POLL_S = 1.0  # how often the runs table and a run's status are looked at again
COOKIE = "tunesmith_ui_token"


class ModelPool:
    """The models the chat has loaded, served by one `serve` app; each loaded once, on first use."""

    def __init__(self) -> None:
        self.served: dict[str, Any] = {}  # name -> serve.Served (the dict the serve app reads)
        self.specs: dict[str, str] = {}  # name -> what was loaded
        self.lock = threading.Lock()

    def ensure(self, items: list[tuple[str, str]]) -> list[str]:
        """Load what is not loaded yet (name, spec); returns the names."""
        from tunesmith.serve import load_models

        with self.lock:
            missing = [(n, s) for n, s in items if self.specs.get(n) != s]
            if missing:
                self.served.update(load_models(missing))
                self.specs.update(dict(missing))
        return [n for n, _ in items]

    def close(self) -> None:
        """Stop every engine."""
        from tunesmith.serve import stop_engines

        stop_engines(self.served)


def create_ui_app(runs: Path, *, token: str | None = None) -> Any:
    """The dashboard's FastAPI application over the run folders under `runs`."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from tunesmith.serve import create_app

    runs = Path(runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    pool = ModelPool()
    app = FastAPI(title="tunesmith ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.runs = runs
    app.mount("/serve", create_app(pool.served))
    tokenizers: dict[str, Any] = {}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return error(403, f"forbidden: {exc}; the dashboard reads only inside its runs folder {runs}")

    @app.exception_handler(TunesmithError)
    async def _user_error(_: Request, exc: TunesmithError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if token is None:
            return await call_next(request)
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or \
            request.headers.get("authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(given.encode(), token.encode()):
            return error(401, "this dashboard needs its token: open the address `tunesmith ui` printed (it ends "
                              "in ?token=...), or send 'Authorization: Bearer TOKEN'")
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise TunesmithError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise TunesmithError("the request body must be a JSON object")
        return body

    def run_dir_of(name: str) -> Path:
        path = inside(runs, name)
        if path.parent != runs:
            raise Forbidden(f"{name!r} is not a run folder of {runs}")
        return path

    # ------------------------------------------------------------ the page

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{path:path}")
    async def static(path: str) -> FileResponse:
        file = inside(STATIC, path)
        if not file.is_file():
            raise HTTPException(404, f"no such file: {path}")
        return FileResponse(file)

    # ------------------------------------------------------------ runs

    def table() -> list[dict[str, Any]]:
        return [r.to_dict() for r in list_runs(runs)]

    @app.get("/api/runs")
    async def api_runs() -> dict[str, Any]:
        return {"runs": await asyncio.to_thread(table), "root": str(runs)}

    @app.get("/api/events/runs")
    async def events_runs(request: Request) -> StreamingResponse:
        async def stream():
            last = None
            while not await request.is_disconnected():
                rows = await asyncio.to_thread(table)
                text = json.dumps({"runs": rows, "root": str(runs)})
                # wall time and ETA change every second; send when anything else changed, or every 5 s
                key = json.dumps([{k: v for k, v in r.items() if k not in ("wall_s", "eta_s")} for r in rows])
                if key != last or int(time.time()) % 5 == 0:
                    yield f"data: {text}\n\n"
                    last = key
                await asyncio.sleep(STATUS_POLL_S)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def detail(name: str) -> dict[str, Any]:
        run_dir = run_dir_of(name)
        job = run_job(runs, name)
        if not is_run_dir(run_dir) and job is None:
            raise HTTPException(404, f"no run {name!r} in {runs}")
        row = run_row(runs, name, job).to_dict()
        config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if is_run_dir(run_dir) else None
        return {**row, "config": config_text, "samples": latest_samples(run_dir) if row["rl"] else [],
                "log_tail": job.log_tail(25) if job is not None else None,
                "resume_command": f"tunesmith train {run_dir / 'config.yaml'}"}

    @app.get("/api/runs/{name}")
    async def api_run(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(detail, name)

    @app.get("/api/events/run/{name}")
    async def events_run(name: str, request: Request) -> StreamingResponse:
        run_dir = run_dir_of(name)
        path = run_dir / "metrics.jsonl"
        await asyncio.to_thread(detail, name)  # 404 now for a run that is not there, rather than a broken stream

        async def stream():
            offset, pending, last_status, next_status = 0, b"", None, 0.0
            while not await request.is_disconnected():
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0
                if size < offset:  # a resumed run cut the file back to its checkpoint: start over
                    offset, pending = 0, b""
                    yield "event: reset\ndata: {}\n\n"
                if size > offset:
                    with open(path, "rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read(size - offset)
                    offset = size
                    pending += chunk
                    *lines, pending = pending.split(b"\n")  # a line without its newline is still being written
                    records = []
                    for line in lines:
                        try:
                            records.append(json.loads(line))
                        except ValueError:
                            continue
                    if records:
                        yield f"event: metrics\ndata: {json.dumps(records)}\n\n"
                if time.time() >= next_status:
                    next_status = time.time() + STATUS_POLL_S
                    try:
                        info = await asyncio.to_thread(detail, name)
                    except HTTPException as exc:  # the folder went away while the page watched it
                        yield f"event: gone\ndata: {json.dumps({'error': str(exc.detail)})}\n\n"
                        return
                    text = json.dumps(info)
                    if text != last_status:
                        last_status = text
                        yield f"event: status\ndata: {text}\n\n"
                await asyncio.sleep(METRICS_POLL_S)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs/{name}/files/{path:path}")
    async def run_file(name: str, path: str) -> FileResponse:
        file = inside(run_dir_of(name), path)
        if not file.is_file():
            raise HTTPException(404, f"no file {path!r} in run {name!r}")
        return FileResponse(file)

    @app.post("/api/runs/{name}/stop")
    async def stop_run(name: str) -> dict[str, Any]:
        run_dir = run_dir_of(name)
        pid = holder(run_dir) if run_dir.is_dir() else None
        job = run_job(runs, name)
        if pid is None and job is not None and job.alive and job.pid:
            pid = job.pid  # still loading: SIGTERM ends it at once, before it wrote anything to resume from
        if pid is None or pid < 0:
            raise TunesmithError(f"run {name!r} is not running, so there is nothing to stop")
        jobs.stop(pid)
        return {"stopped": pid, "message": f"sent SIGTERM to pid {pid}: it finishes its step, writes a checkpoint "
                                           "and exits; Resume continues from there"}

    @app.post("/api/runs/{name}/resume")
    async def resume_run(name: str) -> dict[str, Any]:
        run_dir = run_dir_of(name)
        if not is_run_dir(run_dir):
            raise TunesmithError(f"run {name!r} has no config.yaml yet, so there is nothing to resume")
        row = run_row(runs, name, run_job(runs, name))
        if row.status in ("running", "finished"):
            raise TunesmithError(f"run {name!r} is {row.status}; only a stopped or failed run resumes")
        config = (run_dir / "config.yaml")
        # no config for the job record: the folder is a run folder, and its table row reads config.yaml itself
        job = jobs.launch(runs, "train", name, ["train", str(config), f"output_dir={run_dir}"])
        return {"job": job.to_dict(), "command": f"tunesmith train {config}"}

    # ------------------------------------------------------------ new run

    @app.get("/api/schema")
    async def api_schema() -> dict[str, Any]:
        out = forms.schema()
        out["values"] = {**forms.default_values(), "output_dir": str(runs / time.strftime("run-%Y%m%d-%H%M%S"))}
        out["root"] = str(runs)
        return out

    @app.post("/api/check")
    async def api_check(request: Request) -> dict[str, Any]:
        values = (await body_of(request)).get("values") or {}
        return await asyncio.to_thread(forms.check, {str(k): str(v) for k, v in values.items()}, runs)

    @app.post("/api/start")
    async def api_start(request: Request) -> JSONResponse:
        values = (await body_of(request)).get("values") or {}
        checked = await asyncio.to_thread(forms.check, {str(k): str(v) for k, v in values.items()}, runs)
        if not checked["ok"]:
            return JSONResponse(checked, status_code=400)
        out = Path(checked["output_dir"])
        run_dir_of(out.name)
        items = [i for i in checked["overrides"] if not i.startswith("output_dir=")] + [f"output_dir={out}"]
        from tunesmith.config import load_config

        job = jobs.launch(runs, "train", out.name, ["train", *items], config=load_config({}, items).to_dict())
        return JSONResponse({**checked, "name": out.name, "job": job.to_dict()})

    @app.post("/api/inspect")
    async def api_inspect(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        source = str(body.get("path") or "").strip()
        if not source:
            raise TunesmithError("data.train: give the path of a data file to preview")
        model = str(body.get("model") or "").strip()
        max_length = int(body.get("max_length") or 1024)
        fmt = str(body.get("format") or "auto")

        def work() -> str:
            from tunesmith.data import inspect_data

            tokenizer = None
            if model:
                if model not in tokenizers:
                    from tunesmith.config import LoadConfig
                    from tunesmith.model import load_tokenizer, resolve_model

                    load = LoadConfig()
                    tokenizers[model] = load_tokenizer(resolve_model(model, load), load)
                tokenizer = tokenizers[model]
            return inspect_data(source, tokenizer, max_length=max_length, format=fmt)

        return {"text": await asyncio.to_thread(work), "command": f"tunesmith data inspect {source}"
                + (f" --model {model}" if model else "") + f" --max-length {max_length}"}

    # ------------------------------------------------------------ compare and chat

    def model_spec(choice: str) -> tuple[str, str]:
        """(name, spec) of a model the page picked: `run:NAME`, `base:NAME` (a run's base) or a model spec."""
        kind, _, value = choice.partition(":")
        if kind == "run":
            return value, str(run_dir_of(value))
        if kind == "base":
            base = str(_yaml(run_dir_of(value) / "config.yaml").get("model") or "default")
            return f"{value} (base)", base
        return choice, choice

    @app.post("/api/models")
    async def api_models(request: Request) -> dict[str, Any]:
        picked = (await body_of(request)).get("models") or []
        if not isinstance(picked, list) or not picked:
            raise TunesmithError("models: pick at least one model")
        items = [model_spec(str(p)) for p in picked]
        names = await asyncio.to_thread(pool.ensure, items)
        return {"models": [{"name": n, "spec": s} for n, (_, s) in zip(names, items)]}

    @app.get("/api/choices")
    async def api_choices() -> dict[str, Any]:
        rows = await asyncio.to_thread(list_runs, runs)
        choices = []
        for r in rows:
            if r.status == "finished" and r.method != "reward":
                # the base first: it is the left answer in chat and the base of a comparison
                choices.append({"id": f"base:{r.name}", "label": f"{r.name}'s base: {r.model}"})
                choices.append({"id": f"run:{r.name}", "label": f"{r.name} (tuned, {r.method})"})
        return {"choices": choices}

    @app.post("/api/compare")
    async def api_compare(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        picked = body.get("models") or []
        data = str(body.get("data") or "").strip()
        if not isinstance(picked, list) or len(picked) < 2:
            raise TunesmithError("models: pick at least two models; the first is the base the others are compared with")
        if not data:
            raise TunesmithError("data: give a file with prompts and reference answers")
        items = [model_spec(str(p)) for p in picked]
        name = time.strftime("compare-%Y%m%d-%H%M%S")
        out = runs / jobs.STATE_DIR / "compare" / name
        args = ["compare", "--base", items[0][1], "--data", data, "--out", str(out)]
        for n, s in items[1:]:
            args += ["--model", f"{re.sub(r'[^A-Za-z0-9._-]+', '-', n).strip('-')}={s}"]  # a label that is a file name too
        if body.get("limit"):
            args += ["--limit", str(int(body["limit"]))]
        if body.get("max_new_tokens"):
            args += ["--max-new-tokens", str(int(body["max_new_tokens"]))]
        if str(body.get("text") or "").strip():
            args += ["--text", str(body["text"]).strip()]
        if body.get("chain"):
            args.append("--chain")
        job = jobs.launch(runs, "compare", name, args, out=str(out))
        return {"job": job.to_dict()}

    @app.get("/api/jobs")
    async def api_jobs() -> dict[str, Any]:
        found = await asyncio.to_thread(jobs.read_jobs, runs)
        out = []
        for j in reversed(found):
            d = j.to_dict()
            d["report"] = bool(j.out) and (Path(j.out) / "report.html").is_file()
            d["log_tail"] = j.log_tail(8)
            out.append(d)
        return {"jobs": out}

    @app.get("/api/compare/{name}/{path:path}")
    async def compare_file(name: str, path: str) -> FileResponse:
        file = inside(runs / jobs.STATE_DIR / "compare", name, path)
        if not file.is_file():
            raise HTTPException(404, f"no file {path!r} in comparison {name!r}")
        return FileResponse(file)

    return app


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        return {}


def ui(runs: str | Path = "runs", *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> None:
    """Serve the dashboard until interrupted (the `tunesmith ui` command)."""
    import socket

    import uvicorn

    runs = Path(runs).expanduser().resolve()
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise TunesmithError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); another program may "
                             "use the port: give another with --port") from None
    if host not in LOCAL and token is None:
        token = secrets.token_urlsafe(18)
    app = create_ui_app(runs, token=token)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"tunesmith ui: runs in {runs}\n  open {url}\n"
          + ("  (bound beyond this machine: every request needs the token)\n" if host not in LOCAL else "")
          + "  trains started from the page run as their own processes and go on if this stops; Ctrl-C stops it",
          flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.pool.close()
    print(f"tunesmith ui stopped; runs are in {runs}", flush=True)
