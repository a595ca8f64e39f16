"""Serving: `tunesmith serve` against `transformers serve`, and the memory of LoRA runs served on one base.

Run from the repository root:

    python bench/serve.py [--clients 1,4,16] [--max-tokens 64] [--threads 1,2] [--sides ...] [--workdir DIR]
                          [--skip-memory] [--skip-throughput]

Throughput. Each side is an OpenAI-compatible server started as its own process on a free 127.0.0.1 port, on
the built-in default model (SmolLM2-135M-Instruct, CPU, float32), with the same torch threads (OMP_NUM_THREADS;
each `--threads` setting is one pass over the sides, with the goals read on that pass):

  tunesmith         `tunesmith serve default` (continuous batching, model/engine.py)
  transformers      `transformers serve MODEL_FOLDER --device cpu --dtype float32` (one `generate` at a time)
  transformers-cb   the same with `--continuous-batching` (paged attention)

The folder transformers serves is the one tunesmith imports `default` into. For 1, 4 and 16 concurrent clients
(threads of this process, each with the official `openai` client) every client sends its share of the same chat
requests one after the other, non-streaming, greedy (`temperature: 0`), `max_tokens` 64. The prompts ask for long
answers so that every answer runs to the limit; tokens are counted from each response's `usage.completion_tokens`
(what was generated), and the result line says how many answers stopped before the limit. Aggregate new tokens/s
is all completion tokens of a level over its wall time (first request sent to last answer back); latency is each
request's end-to-end time. Each server gets one untimed request and a short concurrent burst first (warm-up:
transformers' continuous batching allocates its paged cache on its first request).

Memory. Three LoRA SFT runs of the default model (r=16, 3 steps each, seeds 1-3, `output.merge: true`) are trained
once with `tunesmith.train` into WORKDIR/runs. Then the resident memory (psutil RSS; USS too, which counts no
shared library twice) of one `tunesmith serve a=RUN1 b=RUN2 c=RUN3` process (one base, three adapters), against
three `tunesmith serve RUNk/merged` processes (the RSS sum), and one process serving the three merged folders;
each read after every model has answered one request.

One JSON line per result on stdout; server logs go to WORKDIR/*.log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_model_path  # noqa: E402  (bench/ is not a package; its scripts run as files)

SIDES = ("tunesmith", "transformers", "transformers-cb")
GOAL_SCALING = 4.0  # 16 clients' aggregate throughput over one client's
GOAL_VS_TRANSFORMERS = 1.5  # 16 clients: tunesmith over the better transformers mode

TOPICS = (
    "the history of the printing press", "how bridges carry their load", "the water cycle", "how vaccines work",
    "the life of honey bees", "the invention of the telephone", "how a compiler turns code into a program",
    "the causes of the seasons", "volcanoes", "the history of chess", "how the internet routes a message",
    "coral reefs", "the steam engine", "how memory works in the brain", "the Roman road network",
    "how a refrigerator keeps food cold", "the migration of birds", "the history of paper money",
    "how solar panels make electricity", "the rules and history of football", "photosynthesis",
    "the first voyages around the world", "how earthquakes are measured", "the history of the bicycle",
    "how airplanes stay in the air", "the Great Barrier Reef", "how a city plans its public transport",
    "the history of writing systems", "how batteries store energy", "rainforests", "the history of clocks",
    "how glass is made",
)
ASKS = (
    "Write a long, detailed essay about {topic}. Cover its history, how it works and why it matters.",
    "Explain {topic} to a curious student in several long paragraphs, with examples.",
    "Write a thorough encyclopedia-style article about {topic}, with many details.",
    "Tell me everything you know about {topic}, in a long and detailed answer.",
)


def make_chats(num: int, seed: int) -> list[list[dict[str, str]]]:
    """Single-turn chats asking for long answers (so that greedy answers run to the token limit)."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    rng.shuffle(topics)
    return [[{"role": "user", "content": rng.choice(ASKS).format(topic=topics[i % len(topics)])}] for i in range(num)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated between the closest ranks."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# ---------------------------------------------------------------- servers


def server_env(threads: int | None) -> dict[str, str]:
    """The environment every server runs in: this checkout first on the path, offline, the same torch threads."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def server_command(side: str, port: int, model_path: str) -> tuple[list[str], str]:
    """(command line, model name to request) of one side's server."""
    if side == "tunesmith":
        return [sys.executable, "-m", "tunesmith.cli", "serve", "default", "--host", "127.0.0.1", "--port",
                str(port)], "default"
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_path, "--device", "cpu",
           "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    if side == "transformers-cb":
        cmd.append("--continuous-batching")
    return cmd, model_path


class Server:
    """A server process on 127.0.0.1:port, its output in a log file; `stop` ends it."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.port, self.log = port, log
        print(f"--- {' '.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
        self.started = time.perf_counter()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    @property
    def url(self) -> str:
        """The OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Block until GET /health answers 200; the seconds it took from the start."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server was not ready after {timeout:.0f} s; see {self.log}")

    def memory_mib(self) -> dict[str, float]:
        """RSS and USS of the server process and its children, in MiB."""
        import psutil

        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        rss = uss = 0
        for p in procs:
            info = p.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
        return {"rss_mib": round(rss / 2**20, 1), "uss_mib": round(uss / 2**20, 1)}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PeakRss:
    """Samples a server's RSS on a thread while a level runs; `peak_mib` is the highest seen."""

    def __init__(self, server: Server, every: float = 0.5) -> None:
        self.server, self.every, self.peak_mib = server, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.server.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, proc.memory_info().rss / 2**20)
            except psutil.Error:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def find_free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- clients


def ask(client: Any, model: str, chats: list[list[dict[str, str]]], index: int, max_tokens: int) -> dict[str, Any]:
    """One non-streaming greedy chat completion of chats[index]: its end-to-end seconds, usage and finish reason."""
    started = time.perf_counter()
    out = client.chat.completions.create(model=model, messages=chats[index], max_tokens=max_tokens, temperature=0)
    ended = time.perf_counter()
    return {"chat": index, "start": started, "end": ended, "latency": ended - started,
            "completion_tokens": out.usage.completion_tokens, "prompt_tokens": out.usage.prompt_tokens,
            "finish_reason": out.choices[0].finish_reason, "text": out.choices[0].message.content}


def run_level(url: str, model: str, chats: list[list[dict[str, str]]], clients: int, per_client: int,
              max_tokens: int) -> list[dict[str, Any]]:
    """`clients` threads, each sending `per_client` requests one after the other; every request's record."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800)

    def one_client(k: int) -> list[dict[str, Any]]:
        return [ask(client, model, chats, (r * clients + k) % len(chats), max_tokens) for r in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        return [rec for recs in pool.map(one_client, range(clients)) for rec in recs]


def level_line(side: str, clients: int, records: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The result line of one concurrency level."""
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    tokens = sum(r["completion_tokens"] for r in records)
    latencies = [r["latency"] for r in records]
    return {"side": side, "clients": clients, "requests": len(records), "completion_tokens": tokens,
            "short_answers": sum(r["completion_tokens"] < max_tokens for r in records),
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in records) / len(records), 1),
            "seconds": round(wall, 2), "new_tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(percentile(latencies, 50), 2), "latency_p95_s": round(percentile(latencies, 95), 2),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def run_side(side: str, threads: int, args: argparse.Namespace, chats: list[list[dict[str, str]]], model_path: str,
             workdir: Path) -> tuple[list[dict[str, Any]], dict[int, dict[int, str]]]:
    """Start one side's server, warm it up, time every level, stop it; (result lines, answers by level)."""
    port = find_free_port()
    cmd, model = server_command(side, port, model_path)
    server = Server(cmd, port, workdir / f"{side}-threads{threads}.log", server_env(threads))
    lines: list[dict[str, Any]] = []
    answers: dict[int, dict[int, str]] = {}
    try:
        ready_s = server.wait_ready()
        warm_started = time.perf_counter()
        run_level(server.url, model, chats, 1, 1, args.max_tokens)
        run_level(server.url, model, chats, min(4, max(args.clients)), 1, 16)
        lines.append({"side": side, "threads": threads, "ready_s": round(ready_s, 1),
                      "warmup_s": round(time.perf_counter() - warm_started, 1), **server.memory_mib()})
        print(json.dumps(lines[-1]), flush=True)
        for clients in args.clients:
            per_client = max(args.rounds, math.ceil(args.min_requests / clients))
            with PeakRss(server) as peak:
                records = run_level(server.url, model, chats, clients, per_client, args.max_tokens)
            lines.append({**level_line(side, clients, records, args.max_tokens), "threads": threads,
                          "peak_rss_mib": round(peak.peak_mib)})
            answers[clients] = {r["chat"]: r["text"] for r in records}
            print(json.dumps(lines[-1]), flush=True)
    finally:
        server.stop()
    return lines, answers


def goals(lines: list[dict[str, Any]], top: int, threads: int) -> dict[str, Any]:
    """The two throughput goals, read on the lines of one threads setting of this run."""
    rate = {(x["side"], x["clients"]): x["new_tokens_per_s"] for x in lines if "clients" in x}
    out: dict[str, Any] = {"goals": f"at {top} clients", "threads": threads}
    ours_top, ours_one = rate.get(("tunesmith", top)), rate.get(("tunesmith", 1))
    if ours_top and ours_one:
        out["tunesmith_scaling"] = round(ours_top / ours_one, 2)
        out[f"goal_scaling_ge_{GOAL_SCALING}"] = ours_top / ours_one >= GOAL_SCALING
    theirs = {s: rate[(s, top)] for s in ("transformers", "transformers-cb") if (s, top) in rate}
    if ours_top and theirs:
        best = max(theirs, key=lambda s: theirs[s])
        out["best_transformers_mode"] = best
        out["ratio_vs_best_transformers"] = round(ours_top / theirs[best], 2)
        out[f"goal_vs_transformers_ge_{GOAL_VS_TRANSFORMERS}"] = ours_top / theirs[best] >= GOAL_VS_TRANSFORMERS
        for s, r in theirs.items():
            out[f"ratio_vs_{s}"] = round(ours_top / r, 2)
    for side in {x["side"] for x in lines if "clients" in x}:
        one, many = rate.get((side, 1)), rate.get((side, top))
        if one and many:
            out[f"scaling_{side}"] = round(many / one, 2)
    return out


# ---------------------------------------------------------------- memory of LoRA runs


def train_lora_runs(workdir: Path, seeds: tuple[int, ...] = (1, 2, 3), steps: int = 3) -> list[Path]:
    """Three tiny LoRA SFT runs of the default model (r=16, merged/ written too); reused when already finished."""
    from pydoc_data.topics import topics

    runs = [workdir / "runs" / f"lora-{seed}" for seed in seeds]
    todo = [(seed, run) for seed, run in zip(seeds, runs) if not (run / "summary.json").is_file()]
    if not todo:
        return runs
    names = sorted(topics)
    rng = random.Random(0)
    rows = []
    for name in rng.sample(names, 32):
        text = topics[name].strip()
        rows.append({"prompt": f"What does the Python documentation say about {name}?", "completion": text[:600]})
    data = workdir / "runs" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed, run in todo:
        config = {"method": "sft", "model": "default", "output_dir": str(run), "data": {"train": str(data)},
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                  "train": {"max_steps": steps, "batch_size": 2, "max_length": 256, "seed": seed, "lr": 1e-3,
                            "save_every": 0},
                  "eval": {"before": False}, "output": {"merge": True}}
        code = f"import tunesmith; tunesmith.train({config!r})"
        print(f"--- training {run}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", code], check=True, env=server_env(None), cwd=ROOT,
                       stdout=sys.stderr, stderr=sys.stderr)
    return runs


def memory_case(case: str, what: str, groups: list[list[str]], workdir: Path, threads: int | None) -> dict[str, Any]:
    """Start one server per group of model arguments, ask each model once, read the processes' memory."""
    import openai

    servers = []
    try:
        for i, group in enumerate(groups):
            port = find_free_port()
            cmd = [sys.executable, "-m", "tunesmith.cli", "serve", *group, "--host", "127.0.0.1", "--port", str(port)]
            servers.append(Server(cmd, port, workdir / f"memory-{case}-{i}.log", server_env(threads)))
        for server in servers:
            server.wait_ready()
        models = []
        for server in servers:
            client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
            for m in client.models.list().data:
                client.chat.completions.create(model=m.id, messages=[{"role": "user", "content": "Say hello."}],
                                               max_tokens=8, temperature=0)
                models.append(m.id)
        per = [s.memory_mib() for s in servers]
        return {"memory": case, "what": what, "processes": len(servers), "models": models,
                "rss_mib": round(sum(p["rss_mib"] for p in per), 1), "uss_mib": round(sum(p["uss_mib"] for p in per), 1),
                "rss_mib_each": [p["rss_mib"] for p in per]}
    finally:
        for server in servers:
            server.stop()


def run_memory(workdir: Path, threads: int | None) -> list[dict[str, Any]]:
    """LoRA runs on one base against merged models: one result line per case, then the ratio."""
    runs = train_lora_runs(workdir)
    names = ("a", "b", "c")
    lines = [
        memory_case("lora-shared", "3 LoRA runs in one process (one base, three adapters)",
                    [[f"{n}={r}" for n, r in zip(names, runs)]], workdir, threads),
        memory_case("merged-3-processes", "3 merged models, one process each",
                    [[f"{n}={r / 'merged'}"] for n, r in zip(names, runs)], workdir, threads),
        memory_case("merged-1-process", "3 merged models in one process",
                    [[f"{n}={r / 'merged'}" for n, r in zip(names, runs)]], workdir, threads),
    ]
    for line in lines:
        print(json.dumps(line), flush=True)
    ratio = {"memory_ratio": "lora-shared / merged-3-processes",
             "rss": round(lines[0]["rss_mib"] / lines[1]["rss_mib"], 3),
             "uss": round(lines[0]["uss_mib"] / lines[1]["uss_mib"], 3),
             "rss_vs_merged_1_process": round(lines[0]["rss_mib"] / lines[2]["rss_mib"], 3)}
    print(json.dumps(ratio), flush=True)
    return [*lines, ratio]


# ---------------------------------------------------------------- main


def main() -> None:
    """Throughput and latency of each side at each concurrency, the goals, then the memory cases."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--min-requests", type=int, default=8,
                        help="at least this many requests per level (one client sends more)")
    parser.add_argument("--threads", default="1,2",
                        help="torch threads of every server (OMP_NUM_THREADS); each setting, comma-separated, is a "
                             "full pass over the sides")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-serve"))
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput part")
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory part")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    model_path = default_model_path()
    chats = make_chats(max(args.min_requests, max(args.clients) * args.rounds), args.seed)
    print(json.dumps({"setup": {"model": "default", "model_path": model_path, "device": "cpu", "dtype": "float32",
                                "server_threads": args.threads, "cores": os.cpu_count(), "clients": args.clients,
                                "max_tokens": args.max_tokens, "rounds": args.rounds,
                                "min_requests": args.min_requests, "chats": len(chats), "sides": sides,
                                "torch": torch.__version__, "transformers": transformers.__version__,
                                "python": platform.python_version(), "workdir": str(args.workdir)}}), flush=True)
    for n, threads in enumerate([] if args.skip_throughput else args.threads):
        lines, answers = [], {}
        # every other pass runs the sides in reverse order, so a drift in the machine's load favours no side
        for side in sides if n % 2 == 0 else sides[::-1]:
            side_lines, answers[side] = run_side(side, threads, args, chats, model_path, args.workdir)
            lines += side_lines
        summary = goals(lines, max(args.clients), threads)
        if "tunesmith" in answers:  # greedy on every side: how many answers are the same text
            for side in answers:
                if side != "tunesmith":
                    pairs = [(answers["tunesmith"][c].get(i), text) for c in args.clients
                             for i, text in answers[side][c].items()]
                    summary[f"same_answers_as_{side}"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        print(json.dumps(summary), flush=True)
    if not args.skip_memory:
        run_memory(args.workdir, args.threads[0])


if __name__ == "__main__":
    main()
