"""`tunesmith chat` driven through stdin with scripted input, and `tunesmith serve` as the command users run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.common import child_env
from tests.methods.test_serve import make_lora_run, prompts, reference_answers
from tunesmith.serve import find_free_port

REPO = Path(__file__).resolve().parents[2]



def _chat(args: list[str], script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "chat", *args], input=script, env=child_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_run(tiny_model_dir, tmp_path_factory.mktemp("chat") / "tuned", 5)


def test_chat_streams_the_models_answers_and_takes_commands(run: Path) -> None:
    first, second = prompts(2)
    expected = reference_answers(str(run), [first])[0]
    done = _chat([str(run), "--temperature", "0", "--max-tokens", "12"],
                 f"{first}\n/temperature 0.5\n/max_tokens 7\n/reset\n/system be brief\n/bogus\n{second}\n/quit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "chatting with tuned" in out
    assert expected in out  # the greedy answer, as eval gives it
    assert "(temperature 0.5, top_p 1.0, max_tokens 12, seed random)" in out
    assert "max_tokens 7" in out and "(conversation reset)" in out and "(system prompt set" in out
    assert "unknown command /bogus" in out
    assert out.count("you> ") >= 7


def test_chat_compare_answers_with_both_models_labelled(run: Path, tiny_model_dir: Path) -> None:
    text = prompts(1)[0]
    tuned, base = reference_answers(str(run), [text])[0], reference_answers(str(tiny_model_dir), [text])[0]
    done = _chat([str(run), "--compare", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "12"],
                 f"{text}\n")  # end of input leaves the chat
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"[tuned] {tuned}" in done.stdout
    assert f"[{tiny_model_dir}] {base}" in done.stdout


def test_a_model_without_chat_template_continues_plain_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    done = _chat([str(plain), "--temperature", "0", "--max-tokens", "5"], "the river\n/quit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "has no chat template, so each message is continued as plain text" in done.stdout
    assert done.stdout.count("you> ") == 2


def test_serve_command_prints_where_and_answers_until_stopped(run: Path) -> None:
    port = find_free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", f"mine={run}", "--port", str(port),
                             "--threads", "1"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.2)
        body = {"model": "mine", "prompt": "the river", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["model"] == "mine"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert f"serving 1 model at http://127.0.0.1:{port}/v1 (decoding on 1 CPU thread)" in out, err[-2000:]
    assert "mine" in out and "server stopped" in out
