"""`tunesmith train` with or without a YAML file: overrides alone run with the documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import write_chat
from tunesmith.cli import main, train_arguments
from tunesmith.config import Config
from tunesmith.errors import TunesmithError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_argument_with_equals_is_an_override() -> None:
    assert train_arguments("c.yaml", ["train.lr=1e-3"]) == ("c.yaml", ["train.lr=1e-3"])
    assert train_arguments("data.train=a.jsonl", ["train.lr=1e-3"]) == (None, ["data.train=a.jsonl", "train.lr=1e-3"])
    assert train_arguments("data={train: a.jsonl}", []) == (None, ["data={train: a.jsonl}"])


@pytest.mark.parametrize("argv", [[], ["train.lr=1e-3"], ["data.train="], ["data=null"]],
                         ids=["nothing", "no-data", "empty-data", "null-data"])
def test_no_yaml_and_no_training_data_is_one_clear_error(argv: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "nothing to train on" in err and "data.train=my.jsonl" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_yaml_after_overrides_is_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "data.train=a.jsonl", "c.yaml"]) == 2
    assert "'c.yaml' is not a key=value override" in capsys.readouterr().err
    with pytest.raises(TunesmithError, match="can only come first"):
        train_arguments("c.yaml", ["d.yaml"])


def test_train_without_yaml_runs_with_the_defaults(tmp_path: Path, tiny_model_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    data = write_chat(tmp_path, 8)
    run = tmp_path / "run"
    rc = main(["train", f"data.train={data}", f"model={tiny_model_dir}", f"output_dir={run}",
               "train.max_steps=2", "train.batch_size=4", "train.max_length=64", "eval.before=false"])
    assert rc == 0, capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    expected = Config().to_dict()
    expected.update(model=str(tiny_model_dir), output_dir=str(run))
    expected["data"]["train"] = str(data)
    expected["train"].update(max_steps=2, batch_size=4, max_length=64)
    expected["eval"]["before"] = False
    assert saved == expected
    assert (run / "summary.json").is_file() and (run / "adapter").is_dir()  # LoRA, the default, was trained


def test_yaml_form_still_works_with_overrides(tmp_path: Path, tiny_model_dir: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    data = write_chat(tmp_path, 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
                                   "data": {"train": str(data)}, "lora": None,
                                   "train": {"max_steps": 1, "batch_size": 4, "max_length": 64},
                                   "eval": {"before": False}}))
    assert main(["train", str(cfg), "train.lr=1e-3"]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["lora"] is None and saved["train"]["lr"] == 1e-3 and saved["train"]["max_steps"] == 1
    assert (tmp_path / "run/model").is_dir()
