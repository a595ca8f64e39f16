"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and Trackio behind one small interface.

`Trackers` holds the trackers of one run (`log.report_to`, main rank only). `core.logs.RunLogger` hands each of
them what it writes to metrics.jsonl, at the same steps; `run.py` starts them with the resolved config as the
run's parameters and ends them with the run's summary numbers and its report files as an artifact. A tracker's
library is imported only when it starts (`config.py` checks before anything loads that it is installed).

Offline first: W&B runs offline unless the user has logged in (WANDB_API_KEY or a netrc entry; an explicit
WANDB_MODE wins); MLflow writes a SQLite store in the run folder unless MLFLOW_TRACKING_URI is set; Trackio
writes its local store. A tracker that raises (a network error, a full disk) is reported once as a warning
and dropped; training goes on and metrics.jsonl stays complete.

Resume: the run folder keeps each tracker's run id (`trackers.json`), so a resumed run continues the same
tracker run. On start each tracker says which steps it already holds, per metric (`Tracker.held`); the loop
then replays metrics.jsonl up to the checkpoint it resumed from, and every (step, metric) the tracker already
has is skipped, so nothing is logged twice and what the killed run never delivered (W&B loses what its
service had not written when the process is killed) is filled in. TensorBoard instead drops what it had
(a purge marker at step 1) and takes the whole replay.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"  # in the run folder: each tracker's run id, to continue it on resume


def saved_ids(run_dir: Path) -> dict[str, dict[str, str]]:
    """The tracker run ids kept in the run folder (empty when there are none)."""
    path = run_dir / TRACKERS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_ids(run_dir: Path, ids: dict[str, dict[str, str]]) -> None:
    """Merge `ids` into the run folder's tracker ids, atomically."""
    merged = {**saved_ids(run_dir), **ids}
    path = run_dir / TRACKERS_FILE
    tmp = path.with_name(f".{TRACKERS_FILE}.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with YAML-like text values: `train.lr` -> `0.0002`, `lora` -> `null`."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _numbers(metrics: dict[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One experiment tracker of a run; `Trackers` calls it, and catches what it raises."""

    name = ""

    def __init__(self, project: str, run_name: str) -> None:
        self.project = project
        self.run_name = run_name
        self.held: dict[str, int] = {}  # metric -> the last step the tracker already holds it at (resumed runs)
        self.held_all = 0  # every metric through this step, when the tracker only knows its last step
        self.location: str | None = None  # where to look at the run, for the run's closing summary
        self.ids: dict[str, str] = {}  # what the run folder keeps to continue this tracker's run on resume

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Open (or, resuming, reopen) the tracker's run with the resolved config as its parameters."""
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics at `step`."""
        raise NotImplementedError

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """Record the summary numbers, attach the artifact files, and close the run as finished."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the tracker after a failure, without marking its run finished."""

    def fresh(self, step: int, key: str) -> bool:
        """True when the tracker does not hold `key` at `step` yet."""
        return step > max(self.held_all, self.held.get(self.key(key), 0))

    def key(self, name: str) -> str:
        """The name the tracker stores metric `name` under."""
        return name


class TensorBoardTracker(Tracker):
    """TensorBoard event files in run_dir/tensorboard (tensorboardX)."""

    name = "tensorboard"

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Open the event writer; resuming, a purge marker at step 1 makes TensorBoard drop the earlier events."""
        from tensorboardX import SummaryWriter

        folder = run_dir / "tensorboard"
        self.writer = SummaryWriter(logdir=str(folder), purge_step=1 if resume else None)
        if not resume:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        self.location = str(folder)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One scalar per finite metric."""
        for key, value in metrics.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """The summary numbers as scalars at the last step; TensorBoard keeps no files."""
        step = int(summary.get("summary/steps", 0))
        for key, value in summary.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.close()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


def wandb_logged_in() -> bool:
    """True when W&B has credentials here: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# W&B's transaction log (`run-ID.wandb`): a 7-byte header (":W&B", magic, version), then LevelDB-style records
# in 32 KiB blocks, each a 7-byte header (CRC-32 of type + data, length, type) and a piece of a protobuf Record.
_WANDB_HEADER = struct.Struct("<4sHB")
_WANDB_RECORD = struct.Struct("<IHB")
_WANDB_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The serialized records of a W&B offline run file, up to the first torn or unwritten one."""
    data = path.read_bytes()
    if len(data) < _WANDB_HEADER.size or _WANDB_HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        return
    pos, parts = _WANDB_HEADER.size, b""
    while True:
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < _WANDB_RECORD.size:
            pos += left  # the block's tail is padding
            continue
        if pos + _WANDB_RECORD.size > len(data):
            return
        crc, length, kind = _WANDB_RECORD.unpack_from(data, pos)
        piece = data[pos + _WANDB_RECORD.size : pos + _WANDB_RECORD.size + length]
        if len(piece) < length or crc != zlib.crc32(piece, zlib.crc32(bytes([kind]))) or kind not in (1, 2, 3, 4):
            return
        pos += _WANDB_RECORD.size + length
        parts = piece if kind in (_FULL, _FIRST) else parts + piece
        if kind in (_FULL, _LAST):
            yield parts
            parts = b""


def wandb_offline_held(wandb_dir: Path, run_id: str) -> dict[str, int]:
    """Metric -> last step held in the W&B offline files of run `run_id` (every earlier attempt's folder)."""
    from wandb.proto import wandb_internal_pb2 as pb

    held: dict[str, int] = {}
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for raw in wandb_records(path):
            record = pb.Record()
            try:
                record.ParseFromString(raw)
            except Exception:  # noqa: BLE001 - a record this protobuf version cannot read ends the scan
                break
            if record.WhichOneof("record_type") != "history":
                continue
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            step = int(json.loads(items.get("_step", "0")))
            for key in items:
                if not key.startswith("_"):
                    held[key] = max(held.get(key, 0), step)
    return held


# W&B run id -> metric -> last step logged by this process. `run.finish()` returns before W&B's service has
# written the run's file out, so a run resumed in the same process (after an error) would not find its last steps.
_WANDB_LOGGED: dict[str, dict[str, int]] = {}


class WandbTracker(Tracker):
    """Weights & Biases: offline files in run_dir/wandb unless the user has logged in."""

    name = "wandb"

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Open the run (the saved id when resuming), offline unless logged in."""
        import wandb

        run_id = (saved_ids(run_dir).get(self.name, {}).get("run_id") if resume else None) or uuid.uuid4().hex[:12]
        mode = None if os.environ.get("WANDB_MODE") else ("online" if wandb_logged_in() else "offline")
        self.run = wandb.init(
            project=self.project, name=self.run_name, id=run_id, resume="allow", dir=str(run_dir), config=config,
            allow_val_change=True, mode=mode, reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True, save_code=False),
        )
        self.ids = {"run_id": run_id}
        if resume:
            self.held = wandb_offline_held(run_dir / "wandb", run_id)
            for key, step in _WANDB_LOGGED.get(run_id, {}).items():
                self.held[key] = max(self.held.get(key, 0), step)
            self.held_all = max(0, self.run.starting_step - 1)  # online: what the server already has
        self.logged = _WANDB_LOGGED.setdefault(run_id, {})
        if self.run.offline:
            self.location = f"{run_dir / 'wandb'} (offline; `wandb sync {run_dir / 'wandb'}/offline-run-*` uploads it)"
        else:
            self.location = self.run.url

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One history row per step (the loop's train and eval metrics of a step join in it)."""
        self.run.log(metrics, step=step)
        self.logged.update(dict.fromkeys(metrics, step))

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """Summary numbers into the run summary, the files as one artifact of type `report`."""
        import wandb

        self.run.summary.update(summary)
        if artifacts:
            artifact = wandb.Artifact(f"run-{self.run.id}-report", type="report")
            for path in artifacts:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish()

    def close(self) -> None:
        """End the run as failed."""
        self.run.finish(exit_code=1)


class MlflowTracker(Tracker):
    """MLflow: a SQLite store in run_dir/mlflow unless MLFLOW_TRACKING_URI is set."""

    name = "mlflow"

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Create (or reopen) the run, log the config as parameters, and read which steps it holds."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if not uri:
            store = (run_dir / "mlflow").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            artifact_location = (store / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.project)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(self.project, artifact_location=artifact_location))
        run = None
        saved = saved_ids(run_dir).get(self.name, {}).get("run_id") if resume else None
        if saved:
            try:
                run = self.client.get_run(saved)
            except MlflowException:
                run = None  # not in this store (another tracking URI): a new run, given the whole replay
        if run is None:
            run = self.client.create_run(experiment_id, run_name=self.run_name,
                                         tags={"tunesmith.run_dir": str(run_dir.resolve())})
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self.ids = {"run_id": self.run_id, "tracking_uri": uri}
        params = [Param(k, v) for k, v in flat_params(config).items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        for key in run.data.metrics:
            self.held[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
        self.location = uri if artifact_location is None else (
            f"{run_dir / 'mlflow'} (`mlflow ui --backend-store-uri {uri}`)")

    def key(self, name: str) -> str:
        """MLflow's form of a metric name: characters it refuses (a reward's `regex:PATTERN`) become `_`, and so do
        path parts a file system would resolve (`.`, `..`, empty)."""
        parts = re.sub(r"[^/\w.\- :]", "_", name).split("/")
        return "/".join(p if p not in ("", ".", "..") else "_" for p in parts)[:250]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One batch of metrics at `step`."""
        self._log_metrics(step, metrics)

    def _log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """Summary numbers as metrics at the last step, the files as artifacts under report/, then FINISHED."""
        self._log_metrics(int(summary.get("summary/steps", 0)), summary)
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path), artifact_path="report")
        self.client.set_terminated(self.run_id, status="FINISHED")

    def close(self) -> None:
        """End the run as FAILED (a resumed run sets it RUNNING again)."""
        self.client.set_terminated(self.run_id, status="FAILED")


class TrackioTracker(Tracker):
    """Trackio: its local store (TRACKIO_DIR), the run continued by name on resume."""

    name = "trackio"

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Open (or continue) the run of this name with the config, and read which steps it holds."""
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        self.run = trackio.init(project=self.project, name=self.run_name, resume="allow" if resume else "never",
                                config=config, embed=False)
        self.ids = {"run_id": self.run.id, "name": self.run.name}
        if resume:
            for row in SQLiteStorage.get_logs(self.project, run=self.run.name, run_id=self.run.id):
                for key in row:
                    if key not in ("step", "timestamp"):
                        self.held[key] = max(self.held.get(key, 0), int(row["step"]))
        self.location = f"trackio project {self.project!r}, run {self.run.name!r} (`trackio show --project {self.project}`)"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One row of metrics at `step`."""
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """Summary numbers as one row at the last step, the files as one artifact of type `report`."""
        import trackio

        self.run.log(summary, step=int(summary.get("summary/steps", 0)))
        if artifacts:
            artifact = trackio.Artifact(f"run-{self.run.id}-report", type="report")
            for path in artifacts:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish()

    def close(self) -> None:
        """Flush what is queued; Trackio has no failed state."""
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {
    t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)
}


class Trackers:
    """The trackers of one run: started, fed and ended together. One that raises is reported once and dropped."""

    def __init__(self, names: Sequence[str] = (), *, project: str = "tunesmith", run_name: str = "run") -> None:
        self.trackers: list[Tracker] = [TRACKERS[name](project, run_name) for name in names]

    def __bool__(self) -> bool:
        """True while some tracker is running."""
        return bool(self.trackers)

    @property
    def locations(self) -> dict[str, str]:
        """Tracker name -> where to look at its run."""
        return {t.name: t.location for t in self.trackers if t.location}

    def _call(self, tracker: Tracker, when: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            log.warning("experiment tracker %s failed %s (%s: %s); training goes on without it, and metrics.jsonl "
                        "has every step", tracker.name, when, type(exc).__name__, exc)
            self.trackers.remove(tracker)
            if when != "at the start":
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001, S110 - it already failed once; that was reported
                    pass

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Start every tracker; then keep their run ids in the run folder."""
        for tracker in list(self.trackers):
            self._call(tracker, "at the start", tracker.start, config, run_dir, resume)
        if self.trackers:
            save_ids(run_dir, {t.name: t.ids for t in self.trackers if t.ids})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Hand each tracker the numbers of `step` it does not hold yet."""
        numbers = _numbers(metrics)
        for tracker in list(self.trackers):
            fresh = {k: v for k, v in numbers.items() if tracker.fresh(step, k)}
            if fresh:
                self._call(tracker, f"at step {step}", tracker.log, step, fresh)

    def replay(self, records: Iterable[dict[str, Any]]) -> None:
        """Log metrics.jsonl records again (a resumed run): each tracker takes what it does not hold."""
        for record in records:
            self.log(int(record["step"]), {k: v for k, v in record.items() if k not in ("step", "time")})

    def finish(self, summary: dict[str, float], artifacts: Sequence[Path]) -> None:
        """Hand every tracker the run's summary numbers and artifact files, and close their runs as finished."""
        numbers = _numbers(summary)
        for tracker in list(self.trackers):
            self._call(tracker, "at the end", tracker.finish, numbers, [Path(p) for p in artifacts])
        self.trackers = []

    def close(self) -> None:
        """End every tracker's run as failed (the run stopped with an error)."""
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
                log.warning("experiment tracker %s could not close its run: %s", tracker.name, exc)
        self.trackers = []
