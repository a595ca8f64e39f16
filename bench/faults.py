"""Each fault tunesmith survives, injected into a tiny run: what the user saw, and whether the resumed run's final
weights equal an uninterrupted run's, bit for bit. Prints one JSON line per fault.

    python bench/faults.py            # a 16 MiB tmpfs for the full disk (as root), else a file-size limit

The faults are injected as `tests/faults/` injects them (the same child-process scripts, the same hooks), on the
tiny random model the tests build; paths in the messages are shortened to RUN/, DISK/ and TMP/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    """Run every fault and print its JSON line."""
    import torch

    import tunesmith
    from tests.conftest import write_jsonl
    from tests.faults import test_checkpoints as tc
    from tests.faults import test_disk_full as td
    from tests.faults import test_lock as tl
    from tests.faults import test_nonfinite_and_memory as tn
    from tests.faults import test_signals as ts
    from tests.faults.common import child_env, run_child, small_run
    from tests.helpers import chat_rows, final_weights, write_chat
    from tests.tiny import build_model
    from tunesmith.cli import main as cli
    from tunesmith.errors import TunesmithError

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-faults-"))
    model = build_model(tmp / "model")
    data = write_chat(tmp, 24)
    straight_cfg, _ = small_run(tmp, model, data, "straight")
    tunesmith.train(straight_cfg)
    expected = final_weights(tmp / "straight")
    n = iter(range(1000))

    def fresh(**train: Any) -> tuple[dict, Path, Path]:
        name = f"run{next(n)}"
        cfg, config = small_run(tmp, model, data, name, **train)
        return cfg, config, tmp / name

    def same(run: Path) -> bool:
        got = final_weights(run)
        return got.keys() == expected.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    def said(text: str, *folders: tuple[Path, str]) -> str:
        lines = [x for x in text.splitlines()
                 if x.strip() and x.startswith(("tunesmith:", "  ", "checkpoint ", "resuming", "step "))]
        out = "\n".join(lines).strip()
        for folder, name in folders:
            out = out.replace(str(folder), name)
        return out.replace(str(tmp), "TMP").replace(os.getcwd(), "CWD")

    def report(fault: str, message: str, **facts: Any) -> None:
        print(json.dumps({"fault": fault, "message": message, **facts}, ensure_ascii=False), flush=True)

    def caught(fn, *args, **kwargs) -> str:
        try:
            fn(*args, **kwargs)
        except TunesmithError as exc:
            return f"tunesmith: error: {exc}"
        raise AssertionError("no error")

    # 1. signals
    for sig, twice in (("SIGTERM", "once"), ("SIGINT", "once"), ("SIGTERM", "twice")):
        cfg, config, run = fresh()
        stopped = run_child(ts.SIGNALLED, config, 5, sig, twice)
        message = said(stopped.stderr, (run, "RUN")) or f"(none: the process ended by signal {-stopped.returncode})"
        tunesmith.train(cfg)
        report(f"{sig} in step 5" + (", again while checkpointing" if twice == "twice" else ""), message,
               exit_code=stopped.returncode, resumed_from=json.loads((run / "summary.json").read_text())["resumed_from"],
               resumed_equals_uninterrupted=same(run))

    # 2. a damaged newest checkpoint; then none good
    for kind, (name, damage, _) in tc.DAMAGE.items():
        cfg, _, run = fresh()
        try:
            tunesmith.train(cfg, callbacks=[tc.FailAt(8)])
        except RuntimeError:
            pass
        damage(run / "checkpoints/step-0000006" / name)
        err = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(run / "config.yaml")],
                             env=child_env(), capture_output=True, text=True, timeout=600).stderr
        report(f"checkpoint: {kind} in the newest", said(err, (run, "RUN")),
               resumed_from=json.loads((run / "summary.json").read_text())["resumed_from"],
               resumed_equals_uninterrupted=same(run))
    cfg, _, run = fresh()
    try:
        tunesmith.train(cfg, callbacks=[tc.FailAt(8)])
    except RuntimeError:
        pass
    tc.flip_a_byte(run / "checkpoints/step-0000006/trainable.safetensors")
    (run / "checkpoints/step-0000003/optimizer.pt").unlink()
    report("checkpoint: every one damaged", said(caught(tunesmith.train, cfg), (run, "RUN")))

    # 3. a full disk
    disk = tmp / "disk"
    disk.mkdir()
    mode = "rlimit"
    if os.environ.get("FAULTS_DISK") != "rlimit" and shutil.which("mount"):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode == 0:
            mode = "tmpfs"
    small = td.SmallDisk(disk, mode)
    try:
        cfg, config = small_run(disk, model, data, "run")
        run = disk / "run"
        full = run_child(td.TRAIN_FILLING, config, mode, disk, 3)
        report(f"full disk ({mode}) while checkpointing", said(full.stderr, (run, "RUN")), exit_code=full.returncode,
               left=sorted(p.name for p in (run / "checkpoints").iterdir()))
        small.free()
        full = run_child(td.TRAIN_FILLING, config, mode, disk, "outputs")
        report(f"full disk ({mode}) while writing the outputs", said(full.stderr, (run, "RUN")),
               exit_code=full.returncode)
        small.free()
        result = tunesmith.train(cfg)
        report("... space freed, same command again", "", resumed_from=result.loop.resumed_from,
               resumed_equals_uninterrupted=same(run))
        rows = write_jsonl(tmp / "test.jsonl", chat_rows(3))
        out = disk / "report"
        args = ["--base", str(model), "--tuned", str(model), "--data", str(rows), "--out", str(out), "--limit", "2",
                "--max-new-tokens", "4"]
        cli(["compare", *args])
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        full = run_child(td.COMPARE_FILLING, mode, disk, *args)
        report(f"full disk ({mode}) while compare writes its report", said(full.stderr, (out, "DISK/report")),
               exit_code=full.returncode, old_report_intact={p.name: p.read_bytes() for p in out.iterdir()} == before)
    finally:
        if mode == "tmpfs":
            subprocess.run(["umount", str(disk)], check=True)

    # 4. two processes, one run folder
    cfg, config, run = fresh()
    ready = tmp / "ready"
    first = subprocess.Popen([sys.executable, "-c", tl.HELD, str(config), "4", str(ready)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        tl.wait_for(ready, first)
        report("a second train on a live run's folder", said(caught(tunesmith.train, cfg), (run, "RUN")).replace(
            str(first.pid), "PID"))
        compare = [sys.executable, "-m", "tunesmith.cli", "compare", "--base", str(model), "--tuned", str(run),
                   "--data", str(data), "--out", str(tmp / "cmp")]
        err = subprocess.run(compare, env=child_env(), capture_output=True, text=True, timeout=600).stderr
        report("compare on a run still training", said(err, (run, "RUN")).replace(str(first.pid), "PID"))
    finally:
        first.kill()
        first.wait()
    err = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config)], env=child_env(),
                         capture_output=True, text=True, timeout=600).stderr
    report("train after the first was killed (stale lock)", said(err, (run, "RUN")).replace(str(first.pid), "PID"),
           resumed_from=json.loads((run / "summary.json").read_text())["resumed_from"],
           resumed_equals_uninterrupted=same(run))

    # 5. NaN and out of memory (run in this process; messages as the command line prints them)
    cfg, _, run = fresh(save_every=0)
    result = tunesmith.train(cfg, callbacks=[tn.Poison("nan_loss", {3})])
    report("NaN loss at step 3", "step 3: loss nan, gradient norm nan: not finite, the update is skipped (1 in a row, "
           "1 in all)", nonfinite_steps=result.loop.nonfinite_steps, run_finished=True)
    cfg, _, run = fresh()
    report("NaN loss at steps 4, 5, 6", said(caught(tunesmith.train, cfg, callbacks=[tn.Poison("nan_loss", {4, 5, 6})]),
                                            (run, "RUN")))
    cfg, _, run = fresh()
    report("torch.OutOfMemoryError in step 2",
           said(caught(tunesmith.train, cfg, callbacks=[tn.Poison(torch.OutOfMemoryError, {2})])))

    # 6. a bad value in a row
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": "user", "content": 42},
                                                      {"role": "assistant", "content": "yo"}]}) + "\n")
    cfg, _, run = fresh()
    cfg["data"]["train"] = str(bad)
    report("a message's content is the number 42", said(caught(tunesmith.train, cfg)))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
