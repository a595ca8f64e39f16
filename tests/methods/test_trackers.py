"""Experiment trackers (`log.report_to`): each real library, offline, holds what metrics.jsonl holds, at the same
steps and with the same values, also across a run killed with SIGKILL and resumed; the config, the summary and
the report reach them; a tracker that breaks mid-run costs a warning, not the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

import tunesmith
from tests.conftest import write_jsonl
from tests.helpers import chat_rows, run_config, write_chat
from tunesmith.core.loop import LoopCallback
from tunesmith.errors import TunesmithError

REPO = Path(__file__).resolve().parents[2]
PROJECT = "tunesmith-test"
RUN_NAME = "tracked"
WALL_CLOCK = {"tokens_per_s"}  # the one metric a step redone after a resume may log differently
FINAL = ("summary/", "report/")  # the end-of-run numbers, logged beside the steps by MLflow and Trackio

# A run stopped at the end of a chosen step (after that step is logged) through the loop's callback hook, so the
# stop lands at the same point on every machine, however fast: by an exception (the run closes its trackers'
# runs as failed), or by SIGKILL (nothing gets to close anything).
STOPPED_AT_STEP = """
import os, signal, sys
import tunesmith
from tunesmith.core.loop import LoopCallback

class StopAt(LoopCallback):
    def on_step_end(self, step, outcome):
        if step == int(sys.argv[2]):
            if sys.argv[3] == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("stopped by the test")

tunesmith.train(sys.argv[1], sys.argv[4:], callbacks=[StopAt()])
"""

# Trackio's own reading of its local store (TRACKIO_DIR is read when trackio is imported, so in a process of its own).
READ_TRACKIO = """
import json, sys
import trackio
from trackio.sqlite_storage import SQLiteStorage

project = sys.argv[1]
runs = []
for run in trackio.Api().runs(project):
    links = SQLiteStorage.get_run_artifacts(project, run.name, run.id)["output"]
    files = []
    for link in links:
        manifest = SQLiteStorage.get_artifact_manifest(project, link["name"], None) or {}
        files += [entry["path"] for entry in manifest.get("manifest", manifest.get("entries", []))]
    runs.append({"name": run.name, "id": run.id, "config": run.config, "artifacts": links, "files": files,
                 "logs": SQLiteStorage.get_logs(project, run=run.name, run_id=run.id)})
print(json.dumps(runs, default=str))
"""


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who never logged in anywhere: no keys, no netrc, no tracking server."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_")) and k not in ("NETRC", "HF_TOKEN")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update({"HOME": str(home), "TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_DATA_DIR": str(home / "wandb-data"),
                "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    return env


def _expected(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, metric) -> value, from metrics.jsonl."""
    expected = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time"):
                assert (record["step"], key) not in expected, f"metrics.jsonl has {key} twice at step {record['step']}"
                expected[(record["step"], key)] = value
    return expected


def _assert_same(name: str, got: list[tuple[int, str, float]], expected: dict, redone: set[int]) -> None:
    """Every (step, metric) of metrics.jsonl once, with its value; wall-clock ones of redone steps may differ."""
    seen: dict[tuple[int, str], float] = {}
    for step, key, value in got:
        assert (step, key) not in seen, f"{name}: {key} logged twice at step {step}"
        seen[(step, key)] = value
    assert sorted(seen) == sorted(expected), f"{name}: steps/metrics differ from metrics.jsonl"
    for (step, key), value in expected.items():
        if key in WALL_CLOCK and step in redone:
            continue
        assert seen[(step, key)] == pytest.approx(value, rel=1e-12, abs=0), f"{name}: {key} at step {step}"


# ---------------------------------------------------------------- W&B's offline run files


def _wandb_records(path: Path):
    """W&B's transaction log: a 7-byte ':W&B' header, then LevelDB-log records in 32 KiB blocks holding
    wandb.proto `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:
            break
        piece = data[pos + 7 : pos + 7 + length]
        assert crc == zlib.crc32(piece, zlib.crc32(bytes([kind]))), f"{path}: bad record at {pos}"
        pos += 7 + length
        pending += piece
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(wandb_dir: Path, run_id: str) -> dict:
    """History, summary, config and artifact files of one W&B run, over all its offline folders, oldest first."""
    files = sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    out: dict = {"files": files, "history": [], "summary": {}, "config": {}, "artifacts": []}
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                out["history"] += [(row["_step"], k, v) for k, v in row.items() if not k.startswith("_")]
            elif kind == "summary":
                for item in record.summary.update:
                    out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                for item in record.run.config.update:
                    out["config"][item.key] = json.loads(item.value_json)
            elif kind == "artifact":
                out["artifacts"].append((record.artifact.type, [e.path for e in record.artifact.manifest.contents]))
    return out


def _tensorboard_events(path: Path):
    """The events of a TensorBoard event file (TFRecords: length, its CRC, an `Event`, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        event = Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        yield event


def _tracked_config(tmp_path: Path, model: Path, report_to: list[str], **train) -> dict:
    data = write_chat(tmp_path, 16)
    cfg = run_config(model, data, tmp_path / "run", **{"max_steps": 8, "max_length": 64, **train})
    cfg["data"]["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", chat_rows(4)))
    cfg["eval"] = {"max_new_tokens": 4}
    cfg["log"] = {"report_to": report_to, "project": PROJECT, "run_name": RUN_NAME}
    return cfg


def test_trackers_hold_metrics_jsonl_across_stops_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Checkpoints every 2 steps. The first attempt (TensorBoard, W&B, MLflow) stops with an error after step 3: its
    # trackers close their runs as failed, W&B's file holding steps 1-3. The second (Trackio added) resumes from
    # step 2, so step 3 is done again, and is killed with SIGKILL after step 5: MLflow wrote steps 4-5 as they
    # came, W&B's service had written nothing of them. The third resumes from step 4 and finishes; metrics.jsonl
    # is replayed to the trackers, each taking the steps it lacks. Each must end with every step of metrics.jsonl
    # exactly once, and the same values (a step done again may differ in its wall-clock speed only).
    cfg = _tracked_config(tmp_path, tiny_model_dir, ["tensorboard", "wandb", "mlflow", "trackio"],
                          save_every=2, eval_every=4)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = _offline_env(tmp_path)
    run_dir = tmp_path / "run"

    def attempt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", STOPPED_AT_STEP, str(cfg_path), *args], env=env,
                              capture_output=True, text=True, timeout=600)

    first = attempt("3", "raise", "log.report_to=[tensorboard,wandb,mlflow]")
    assert first.returncode == 1 and "stopped by the test" in first.stderr, first.stderr[-3000:]
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}
    second = attempt("5", "sigkill")
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    third = attempt("0", "raise")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "experiment tracker" not in third.stderr and "Traceback" not in third.stderr, third.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    # the same W&B and MLflow runs go on; Trackio continues the run of the same name (a new one only when the
    # killed attempt had stored nothing yet, which its writer thread's timing decides)
    after = json.loads((run_dir / "trackers.json").read_text())
    assert after["wandb"] == ids["wandb"] and after["mlflow"] == ids["mlflow"], "a resumed run opened new runs"
    assert after["trackio"]["name"] == RUN_NAME
    redone = {3, 5}

    expected = _expected(run_dir)
    assert sorted({step for step, _ in expected}) == list(range(1, 9))
    assert {(4, "eval_loss"), (8, "eval_loss"), (8, "loss")} <= set(expected)
    report_files = {"summary.json", "report.html", "results.json"}

    # W&B: both attempts' offline folders belong to the one run id
    wandb_run = _wandb_run(run_dir / "wandb", ids["wandb"]["run_id"])
    assert len(wandb_run["files"]) == 3
    _assert_same("wandb", wandb_run["history"], expected, redone)
    assert wandb_run["summary"]["summary/steps"] == 8
    assert wandb_run["summary"]["summary/resumed_from"] == 4
    assert "report/tuned/exact_match" in wandb_run["summary"] and "report/tuned/exact_match_delta" in wandb_run["summary"]
    assert wandb_run["config"]["train"]["max_steps"] == 8 and wandb_run["config"]["log"]["project"] == PROJECT
    assert [(kind, set(paths)) for kind, paths in wandb_run["artifacts"]] == [("report", report_files)]

    # MLflow: the SQLite store in the run folder, one run, read with MLflow's client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(PROJECT)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == RUN_NAME
    history = [(m.step, key, m.value) for key in run.data.metrics if not key.startswith(FINAL)
               for m in client.get_metric_history(run.info.run_id, key)]
    _assert_same("mlflow", history, expected, redone)
    assert run.data.metrics["summary/steps"] == 8 and "report/tuned/exact_match" in run.data.metrics
    assert run.data.params["train.max_steps"] == "8" and run.data.params["lora.r"] == "8"
    # MLflow parameters cannot change once logged: those of the first attempt stay
    assert run.data.params["log.report_to"] == '["tensorboard", "wandb", "mlflow"]'
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {f"report/{f}" for f in report_files}

    # Trackio: its local store, read with its own API
    read = subprocess.run([sys.executable, "-c", READ_TRACKIO, PROJECT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    (trackio_run,) = json.loads(read.stdout.strip().splitlines()[-1])
    assert trackio_run["name"] == RUN_NAME and trackio_run["id"] == after["trackio"]["run_id"]
    rows = [(row["step"], key, value) for row in trackio_run["logs"] for key, value in row.items()
            if key not in ("step", "timestamp") and not key.startswith(FINAL)]
    _assert_same("trackio", rows, expected, redone)
    final = {k: v for row in trackio_run["logs"] for k, v in row.items() if k.startswith(FINAL)}
    assert final["summary/steps"] == 8 and "report/tuned/exact_match" in final
    assert trackio_run["config"]["train"]["max_steps"] == 8
    assert set(trackio_run["files"]) == report_files, trackio_run["artifacts"]

    # TensorBoard: the last attempt's file opens with a purge marker at step 1 (TensorBoard then drops the earlier
    # attempts' events) and holds the whole run, the replayed steps included; its scalars are float32
    from tensorboardX.proto.event_pb2 import SessionLog

    last = max((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    events = [e for e in _tensorboard_events(last) if not e.file_version]
    assert events[0].session_log.status == SessionLog.START and events[0].step == 1
    scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value
               if not v.tag.startswith(FINAL)]
    float32 = {k: float(struct.unpack("f", struct.pack("f", v))[0]) for k, v in expected.items()}
    _assert_same("tensorboard", scalars, float32, redone)


class _CorruptStoreAt(LoopCallback):
    """Overwrites the head of a SQLite file at the end of a step: the store is unreadable from then on."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_step_end(self, step: int, outcome) -> None:
        if step == self.step:
            with open(self.path, "r+b") as f:
                f.write(b"\0" * 4096)


def test_a_tracker_that_breaks_mid_run_costs_one_warning(tmp_path: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    env = _offline_env(tmp_path)
    for key in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_"))] + ["NETRC"]:
        monkeypatch.delenv(key, raising=False)
    for key in ("HOME", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(key, env[key])
    cfg = _tracked_config(tmp_path, tiny_model_dir, ["mlflow", "wandb"], max_steps=6)
    del cfg["data"]["eval"], cfg["eval"]
    store = tmp_path / "run" / "mlflow" / "mlflow.db"
    with caplog.at_level(logging.WARNING, logger="tunesmith.core.trackers"):
        result = tunesmith.train(cfg, callbacks=[_CorruptStoreAt(store, 2)])
    warnings = [r.getMessage() for r in caplog.records if r.name == "tunesmith.core.trackers"]
    assert len(warnings) == 1 and "mlflow failed at step 3" in warnings[0], warnings
    assert result.loop.steps == 6 and (tmp_path / "run/summary.json").is_file()
    expected = _expected(tmp_path / "run")
    assert sorted({step for step, _ in expected}) == list(range(1, 7))
    ids = json.loads((tmp_path / "run/trackers.json").read_text())
    import wandb

    wandb.teardown()  # W&B's service writes a run's file out in full when it stops (run.finish() does not wait)
    _assert_same("wandb", _wandb_run(tmp_path / "run/wandb", ids["wandb"]["run_id"])["history"], expected, set())
    assert "mlflow" not in result.outputs and "wandb" in result.outputs


def test_only_rank_0_logs(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _tracked_config(tmp_path, tiny_model_dir, ["mlflow"], max_steps=2, batch_size=2)
    del cfg["data"]["eval"], cfg["eval"]
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tunesmith.cli", "train", str(cfg_path)]
    proc = subprocess.run(cmd, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'run/mlflow/mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    expected = _expected(tmp_path / "run")
    history = [(m.step, key, m.value) for key in run.data.metrics if not key.startswith(FINAL)
               for m in client.get_metric_history(run.info.run_id, key)]
    _assert_same("mlflow", history, expected, set())


@pytest.mark.parametrize("tracker,module", [("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio")])
def test_a_tracker_not_installed_is_a_config_error(tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch, tracker: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not there
    cfg = _tracked_config(tmp_path, tiny_model_dir, ["tensorboard", tracker])
    with pytest.raises(TunesmithError, match=rf"pip install 'tunesmith\[{tracker}\]'"):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_or_repeated_tracker_is_a_config_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _tracked_config(tmp_path, tiny_model_dir, ["tensorboard", "neptune", "tensorboard"])
    with pytest.raises(TunesmithError) as err:
        tunesmith.train(cfg)
    assert "log.report_to[1]" in str(err.value) and "neptune" in str(err.value)
    cfg["log"]["report_to"] = ["tensorboard", "tensorboard"]
    with pytest.raises(TunesmithError, match="tensorboard is listed twice"):
        tunesmith.train(cfg)


def test_mlflow_takes_metric_names_it_would_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an RL run logs one mean per reward function, named by its spec: `regex:PATTERN` has characters MLflow refuses
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from tunesmith.core.trackers import Trackers

    trackers = Trackers(["mlflow"], project=PROJECT, run_name=RUN_NAME)
    trackers.start({"rl": {"rewards": ["regex:^\\{.*\\}$"]}}, tmp_path, resume=False)
    for step in (1, 2):
        trackers.log(step, {"reward/regex:^\\{.*\\}$": step / 4, "reward/length_penalty:50": -step})
    assert trackers.trackers, "MLflow was dropped"
    trackers.finish({"summary/steps": 2}, [])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    assert run.data.params["rl.rewards"] == '["regex:^\\\\{.*\\\\}$"]'
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    assert history == {"reward/regex:___.____": [(1, 0.25), (2, 0.5)], "reward/length_penalty:50": [(1, -1), (2, -2)],
                       "summary/steps": [(2, 2)]}
