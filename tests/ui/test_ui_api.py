"""The dashboard's server without a browser: confined paths, the token, the form's checks, each run's status."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.ui import forms
from tunesmith.ui.app import create_ui_app
from tunesmith.ui.jobs import Job, state_dir
from tunesmith.ui.runs import list_runs


def _run(runs: Path, name: str, steps: int, *, max_steps: int = 10, finished: bool = False,
         checkpoint: int | None = None) -> Path:
    """A run folder as `train` leaves it: config.yaml, metrics.jsonl, and what finishing or stopping adds."""
    run = runs / name
    (run / "report").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "sft", "model": "default",
                                                     "train": {"max_steps": max_steps}}))
    now = time.time()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": now + s, "loss": 3.0 - 0.1 * s,
                                                           "epoch": s / 5}) + "\n" for s in range(1, steps + 1)))
    if finished:
        (run / "summary.json").write_text(json.dumps({"final_loss": 2.0}))
        (run / "report" / "report.html").write_text("<h1>report</h1>")
        (run / "report" / "results.json").write_text(json.dumps({"comparison": {"headline": ["tuned beats base."]}}))
    if checkpoint is not None:
        (run / "checkpoints" / f"step-{checkpoint:07d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{checkpoint:07d}" / "checkpoint.json").write_text("{}")
    return run


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    (tmp_path / "secret.txt").write_text("not yours")
    return folder


def test_runs_table_says_finished_stopped_and_failed(runs: Path) -> None:
    _run(runs, "done", 10, finished=True)
    _run(runs, "paused", 4, checkpoint=4)
    failed = _run(runs, "broken", 0)
    folder = state_dir(runs)
    folder.mkdir(parents=True)
    log = folder / "x.log"
    log.write_text("loading\ntunesmith: error: invalid config (1 problem):\n  - train.lr: must be positive, got -1.0\n")
    job = Job(id="x", kind="train", name=failed.name, argv=["tunesmith", "train"], log=log, record=folder / "x.json",
              started=time.time(), exit_code=2, ended=time.time())
    (folder / "x.json").write_text(json.dumps(job.to_dict()))

    rows = {r.name: r for r in list_runs(runs)}
    assert rows["done"].status == "finished" and rows["done"].headline == ["tuned beats base."]
    assert (rows["done"].step, rows["done"].total_steps) == (10, 10) and rows["done"].has_report
    assert rows["paused"].status == "stopped" and rows["paused"].resumable
    assert rows["paused"].detail == "stopped at step 4; resumable from the checkpoint of step 4"
    assert rows["broken"].status == "failed"
    assert rows["broken"].detail == "error: invalid config (1 problem):\n  - train.lr: must be positive, got -1.0"


def test_paths_that_escape_get_403(runs: Path) -> None:
    from fastapi.testclient import TestClient

    run = _run(runs, "done", 3, finished=True)
    os.symlink(runs.parent / "secret.txt", run / "report" / "link.txt")
    client = TestClient(create_ui_app(runs))
    assert client.get("/api/runs/done/files/report/report.html").text == "<h1>report</h1>"
    for path in ("/api/runs/done/files/..%2F..%2Fsecret.txt", "/api/runs/done/files/report/link.txt",
                 "/api/runs/%2E%2E/files/secret.txt", "/api/runs/done/files/%2Fetc%2Fpasswd",
                 "/static/..%2F..%2F..%2Fconfig.py", "/api/compare/..%2F..%2F..%2F/secret.txt"):
        response = client.get(path)
        assert response.status_code == 403, (path, response.status_code, response.text)
        assert "not yours" not in response.text


def test_token_guards_every_request(runs: Path) -> None:
    from fastapi.testclient import TestClient

    client = TestClient(create_ui_app(runs, token="s3cret"))
    for path in ("/", "/api/runs", "/static/app.js", "/serve/v1/models", "/api/schema"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/?token=s3cret").status_code == 200  # the printed address; it leaves a cookie
    assert client.get("/api/runs").status_code == 200
    assert client.get("/serve/v1/models").status_code == 200


def test_form_gives_the_command_lines_messages_beside_their_fields(runs: Path, tmp_path: Path) -> None:
    values = {**forms.default_values(), "data.train": str(tmp_path / "missing.jsonl"), "train.lr": "-1",
              "train.max_steps": "many", "output_dir": str(runs / "a"), "dpo.beta": "-5"}
    checked = forms.check(values, runs)
    fields = {p["field"]: p["message"] for p in checked["problems"]}
    with pytest.raises(TunesmithError) as cli:
        load_config({}, ["train.max_steps=many", "train.lr=-1"])
    assert fields["train.max_steps"] == cli.value.problems[0]  # the same words as `tunesmith train`
    assert "dpo.beta" not in fields and "dpo.beta=-5" not in checked["overrides"]  # sft reads no dpo settings

    values.update({"train.max_steps": "5", "train.lr": "0.001"})
    checked = forms.check(values, runs)
    assert [p["field"] for p in checked["problems"]] == ["data.train"]
    assert "the data file does not exist" in checked["problems"][0]["message"]

    values.update({"data.train": str(tmp_path / "secret.txt"), "output_dir": str(tmp_path / "elsewhere"),
                   "lora": "null"})
    checked = forms.check(values, runs)
    assert [p["field"] for p in checked["problems"]] == ["output_dir"]
    assert checked["overrides"][-1] == "lora=null"
    assert checked["cli"].startswith("tunesmith train ") and "train.max_steps=5" in checked["cli"]
    assert yaml.safe_load(checked["yaml"])["train"] == {"max_steps": 5, "lr": 0.001}

    checked = forms.check({**values, "output_dir": "my-run"}, runs)  # a bare name is a folder of the runs folder
    assert checked["ok"] and f"output_dir={runs.resolve() / 'my-run'}" in checked["overrides"]


def test_schema_documents_every_key_and_hides_other_methods(runs: Path) -> None:
    schema = forms.schema()
    keys = {k["key"]: k for s in schema["sections"] for k in s["keys"]}
    assert keys["train.lr"]["doc"] == "peak learning rate" and keys["train.lr"]["default"] == "0.0002"
    assert keys["method"]["choices"] == ["sft", "pretrain", "reward", "dpo", "grpo", "ppo"]
    assert keys["output.gguf"]["choices"][-1] == "null"
    assert forms.applies("rl.rewards", "grpo") and not forms.applies("rl.rewards", "sft")
    assert not forms.applies("data.test", "reward") and forms.applies("train.lr", "reward")


def test_compare_launches_the_command_with_the_base_first(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from tunesmith.ui import jobs

    _run(runs, "done", 3, finished=True)
    launched = []
    monkeypatch.setattr(jobs, "launch", lambda root, kind, name, args, **kw: launched.append((kind, args)) or
                        Job(id="c", kind=kind, name=name, argv=args, log=root / "c.log", record=root / "c.json",
                            started=time.time()))
    client = TestClient(create_ui_app(runs))
    assert client.post("/api/compare", json={"models": ["run:done"], "data": "d.jsonl"}).status_code == 400
    response = client.post("/api/compare", json={"models": ["base:done", "run:done", "other/model"],
                                                 "data": "d.jsonl", "limit": 4})
    assert response.status_code == 200, response.text
    ((kind, args),) = launched
    out = args[args.index("--out") + 1]
    assert kind == "compare" and args[:3] == ["compare", "--base", "default"]
    assert args[args.index("--model") + 1] == f"done={runs.resolve() / 'done'}" and "other-model=other/model" in args
    assert Path(out).parent == runs.resolve() / ".tunesmith-ui" / "compare" and args[-2:] == ["--limit", "4"]
    assert client.post("/api/compare", json={"models": ["run:..", "default"], "data": "d"}).status_code == 403


def test_compare_passes_held_out_text_and_the_chain_order(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from tunesmith.ui import jobs

    _run(runs, "done", 3, finished=True)
    launched = []
    monkeypatch.setattr(jobs, "launch", lambda root, kind, name, args, **kw: launched.append(args) or
                        Job(id="c", kind=kind, name=name, argv=args, log=root / "c.log", record=root / "c.json",
                            started=time.time()))
    client = TestClient(create_ui_app(runs))
    for body in ({"text": "docs.jsonl", "chain": True}, {"text": " ", "chain": False}):
        assert client.post("/api/compare", json={"models": ["base:done", "run:done"], "data": "d.jsonl", **body}
                           ).status_code == 200
    with_text, without = launched
    assert with_text[with_text.index("--text") + 1] == "docs.jsonl" and with_text[-1] == "--chain"
    assert "--text" not in without and "--chain" not in without
