"""`tunesmith serve` on a free local port, talked to with the official openai client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.helpers import chat_rows
from tunesmith.config import LoadConfig, LoraConfig
from tunesmith.model import apply_lora, load_model, resolve_model, save_adapter
from tunesmith.model.generate import GenerationSettings, generate
from tunesmith.model.runs import load_run_model
from tunesmith.serve import ServerThread, create_app, find_free_port, load_models

openai = pytest.importorskip("openai")  # a dev dependency: always installed by `make test`

KEY = "sekret"
MAX_TOKENS = 12


def make_lora_run(tiny_model_dir: Path, run: Path, seed: int) -> Path:
    """A finished LoRA run folder (config.yaml naming the base, adapter/) with a non-zero adapter."""
    load = LoadConfig()
    resolved = resolve_model(str(tiny_model_dir), load)
    from tunesmith.model import load_tokenizer

    model = apply_lora(load_model(resolved, load, device=torch.device("cpu")), LoraConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "sft", "model": str(tiny_model_dir)}))
    save_adapter(model, load_tokenizer(resolved, load), run / "adapter")
    return run


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"alpha": make_lora_run(tiny_model_dir, root / "alpha", 1), "beta": make_lora_run(tiny_model_dir, root / "beta", 2)}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, runs: dict[str, Path], one_thread):
    """The base and two LoRA runs of it, sharing one engine, behind an API key."""
    served = load_models([("base", str(tiny_model_dir)), (None, str(runs["alpha"])), (None, str(runs["beta"]))],
                         max_batch=16)
    port = find_free_port()
    thread = ServerThread(create_app(served, api_key=KEY), port=port).start()
    yield {"url": f"http://127.0.0.1:{port}", "served": served}
    thread.stop()
    for engine in {id(s.engine): s.engine for s in served.values()}.values():
        engine.stop()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def prompts(n: int) -> list[str]:
    return [r["prompt"] for r in chat_rows(n)]


def reference_answers(spec: str, texts: list[str]) -> list[str]:
    """What `tunesmith eval` generates greedily for these prompts (the same loader and decoder)."""
    model, tokenizer, _ = load_run_model(spec, LoadConfig(), torch.device("cpu"))
    conversations = [[{"role": "user", "content": t}] for t in texts]
    return [g.text for g in generate(model, tokenizer, conversations, GenerationSettings(max_new_tokens=MAX_TOKENS))]


def ask(client, model: str, text: str, **kw) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                         max_tokens=MAX_TOKENS, temperature=0, **kw)
    return out.choices[0].message.content


def test_models_health_and_one_shared_base(server, client) -> None:
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "base", "beta"]
    health = httpx.get(server["url"] + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["running"] == 0
    engines = {id(s.engine) for s in server["served"].values()}
    assert len(engines) == 1, "the base and both LoRA runs must share one copy of the base weights"


@pytest.mark.parametrize("name", ["base", "alpha", "beta"])
def test_greedy_answers_equal_eval(server, client, tiny_model_dir: Path, runs: dict[str, Path], name: str) -> None:
    texts = prompts(4)
    spec = str(tiny_model_dir) if name == "base" else str(runs[name])
    assert [ask(client, name, t) for t in texts] == reference_answers(spec, texts)


def test_concurrent_requests_equal_sequential_ones(client) -> None:
    texts = prompts(16)
    jobs = [(("alpha", "beta", "base")[i % 3], t) for i, t in enumerate(texts)]
    sequential = [ask(client, m, t) for m, t in jobs]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda job: ask(client, *job), jobs))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the three models really answer differently


def test_streaming_chat_and_completions(client) -> None:
    text = prompts(1)[0]
    whole = ask(client, "alpha", text)
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": text}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens > 0

    plain = client.completions.create(model="base", prompt="the river", max_tokens=MAX_TOKENS, temperature=0)
    streamed = client.completions.create(model="base", prompt="the river", max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


def test_sampling_n_seed_and_stop(client) -> None:
    text = prompts(1)[0]
    kw = {"model": "beta", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
    a = client.chat.completions.create(temperature=1.0, seed=7, n=3, **kw)
    b = client.chat.completions.create(temperature=1.0, seed=7, n=3, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    full = ask(client, "beta", text)
    if len(full) > 3:
        cut = client.chat.completions.create(temperature=0, stop=[full[2:4]], **kw).choices[0]
        assert cut.message.content == full[: full.index(full[2:4])] and cut.finish_reason == "stop"


def post(server, path: str, body, *, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server["url"] + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client) -> None:
    chat = "/v1/chat/completions"
    cases = [
        (post(server, chat, b"{not json"), 400, "not valid JSON"),
        (post(server, chat, {"model": "base"}), 400, "messages"),
        (post(server, chat, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404, "nope"),
        (post(server, chat, {"model": "base", "messages": [{"role": "user", "content": 5}]}), 400, "content"),
        (post(server, chat, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}),
         400, "1024"),
        (post(server, "/v1/completions", {"model": "base", "prompt": "word " * 1100}), 400, "1024"),
        (post(server, chat, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
         400, "temperature"),
        (post(server, chat, {"model": "base", "messages": [{"role": "user", "content": "hi"}]}, key=None), 401, "API key"),
        (post(server, chat, {"model": "base", "messages": [{"role": "user", "content": "hi"}]}, key="wrong"), 401, "API key"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words in error["message"] and {"message", "type", "param", "code"} <= set(error)
    with pytest.raises(openai.NotFoundError):
        ask(client, "missing-model", "hi")
    assert ask(client, "base", "hi")  # still serving


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, client) -> None:
    body = {"model": "alpha", "messages": [{"role": "user", "content": prompts(1)[0]}], "max_tokens": 900,
            "temperature": 1.0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
    assert all(line.startswith("data: ") or not line for line in seen)
    engine = server["served"]["alpha"].engine
    deadline = time.time() + 60
    while engine.num_running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0, "the disconnected stream still holds a row of the batch"
    assert ask(client, "alpha", "hi")


def test_rows_of_several_adapters_in_one_batch_match_each_alone(server) -> None:
    """The engine's per-row adapters: one batch mixing base, alpha and beta rows equals each model run by itself."""
    from tunesmith.model.generate import prompt_ids

    served = server["served"]
    engine = served["base"].engine
    ids = prompt_ids(served["base"].tokenizer, [[{"role": "user", "content": t}] for t in prompts(6)])
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS)
    alone = [engine.generate(p, settings, adapter=served[m].adapter).token_ids
             for p, m in zip(ids, ["base", "alpha", "beta"] * 2)]
    barrier = threading.Barrier(6)

    def together(i: int) -> list[int]:
        barrier.wait()
        return engine.generate(ids[i], settings, adapter=served[["base", "alpha", "beta"][i % 3]].adapter).token_ids

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(together, range(6))) == alone
