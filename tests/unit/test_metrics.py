"""Answer metrics on hand-worked examples, user metrics by module:function, and metrics that fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.data.examples import EvalExample
from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import (
    check_references,
    contains,
    exact_match,
    json_equal,
    json_in_output_match,
    resolve_metrics,
    score_row,
)

USER_METRICS = '''
def length_ratio(prompt, output, reference):
    return len(output) / len(reference)

def shouts(prompt, output, reference):
    if output.isupper():
        raise ValueError("no shouting")
    return 1.0

def words(prompt, output, reference=None):
    return float(len(output.split()))
words.needs_reference = False

def two_args(output, reference):
    return 1.0

NOT_A_FUNCTION = 3
'''


def _example(index: int, reference: str | None = "Paris") -> EvalExample:
    return EvalExample(index=index, location=f"test.jsonl line {index + 1}", messages=[{"role": "user", "content": "q"}],
                       reference=reference, prompt="q")


@pytest.mark.parametrize(("output", "reference", "expected"), [
    ("Paris", "Paris", 1.0),
    ("  Paris \n", "Paris", 1.0),  # ends stripped
    ("New \t York", "New York", 1.0),  # inner runs of whitespace collapsed
    ("paris", "Paris", 0.0),  # case counts
    ("Paris.", "Paris", 0.0),
    ("", "Paris", 0.0),
])
def test_exact_match(output: str, reference: str, expected: float) -> None:
    assert exact_match("q", output, reference) == expected


@pytest.mark.parametrize(("output", "reference", "expected"), [
    ("The capital is Paris.", "Paris", 1.0),
    ("It is New\n  York, I think", "New  York", 1.0),  # both sides normalised
    ("York New", "New York", 0.0),
    ("Pari s", "Paris", 0.0),
])
def test_contains(output: str, reference: str, expected: float) -> None:
    assert contains("q", output, reference) == expected


@pytest.mark.parametrize(("output", "reference", "expected"), [
    ('{"a": 1, "b": [1, 2]}', '{"b":[1,2],"a":1}', 1.0),  # key order and spacing do not matter
    (' [1, "x"]\n', '[1,"x"]', 1.0),
    ('{"a": 1}', '{"a": 2}', 0.0),
    ('{"a": [2, 1]}', '{"a": [1, 2]}', 0.0),  # list order does
    ('Sure! {"a": 1}', '{"a": 1}', 0.0),  # the output must be JSON as a whole
    ('{"a": 1}', "not json", 0.0),
    ("", "{}", 0.0),
])
def test_json_equal(output: str, reference: str, expected: float) -> None:
    assert json_equal("q", output, reference) == expected


def test_json_in_output_match() -> None:
    assert json_in_output_match("q", 'Sure! {"a": 1} hope it helps {"b": 2}', '{"a": 1}') == 1.0
    assert json_in_output_match("q", 'broken { then {"a": 1}', '{"a": 1}') == 1.0
    assert json_in_output_match("q", '{"a": 2}', '{"a": 1}') == 0.0
    assert json_in_output_match("q", "no json", '{"a": 1}') == 0.0


def test_builtin_names_resolve() -> None:
    fns = resolve_metrics(["exact_match", "contains", "json_equal", "exact_match"])
    assert list(fns) == ["exact_match", "contains", "json_equal"]
    assert fns["contains"] is contains


def test_user_metric_by_module_and_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tsm_user_metrics_a.py").write_text(USER_METRICS)
    monkeypatch.chdir(tmp_path)  # the current folder is searched, as for a console script run there
    fns = resolve_metrics(["tsm_user_metrics_a:length_ratio", "tsm_user_metrics_a.py:words"])
    assert fns["tsm_user_metrics_a:length_ratio"]("q", "abcd", "ab") == 2.0
    assert fns["tsm_user_metrics_a.py:words"]("q", "one two three", None) == 3.0


@pytest.mark.parametrize(("name", "message"), [
    ("exactmatch", "unknown; built-in metrics are exact_match"),
    ("tsm_no_such_module_x:f", "module 'tsm_no_such_module_x' not found"),
    ("tsm_user_metrics_b:nope", "has no function 'nope' (it defines length_ratio, shouts, two_args, words)"),
    ("tsm_user_metrics_b:NOT_A_FUNCTION", "is a int, not a function"),
    ("tsm_user_metrics_b:two_args", "cannot be called as fn(prompt, output, reference)"),
    ("missing_file.py:f", "file 'missing_file.py' not found"),
])
def test_bad_metric_names_are_clear(name: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tsm_user_metrics_b.py").write_text(USER_METRICS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunesmithError, match="metric") as err:
        resolve_metrics([name])
    assert message in str(err.value)


def test_a_raising_metric_fails_its_row_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tsm_user_metrics_c.py").write_text(USER_METRICS)
    monkeypatch.chdir(tmp_path)
    fns = resolve_metrics(["exact_match", "tsm_user_metrics_c:shouts"])
    scores, errors = score_row(fns, _example(0), "Paris")
    assert scores == {"exact_match": 1.0, "tsm_user_metrics_c:shouts": 1.0} and errors == {}
    scores, errors = score_row(fns, _example(3), "PARIS")
    assert scores == {"exact_match": 0.0, "tsm_user_metrics_c:shouts": None}
    message = errors["tsm_user_metrics_c:shouts"]
    assert message.startswith("row 3 (test.jsonl line 4): tsm_user_metrics_c.shouts raised ValueError: no shouting")
    assert "tsm_user_metrics_c.py:" in message  # where in the user's file


def test_a_metric_returning_no_number_fails_its_row() -> None:
    scores, errors = score_row({"bad": lambda p, o, r: "yes"}, _example(2), "x")
    assert scores == {"bad": None} and "returned 'yes' (str)" in errors["bad"]
    scores, errors = score_row({"nan": lambda p, o, r: float("nan")}, _example(2), "x")
    assert scores == {"nan": None} and "finite number" in errors["nan"]


def test_metrics_that_need_references_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tsm_user_metrics_d.py").write_text(USER_METRICS)
    monkeypatch.chdir(tmp_path)
    no_refs = [_example(0, None), _example(1, None)]
    fns = resolve_metrics(["exact_match", "tsm_user_metrics_d:words", "contains"])
    with pytest.raises(TunesmithError) as err:
        check_references(fns, no_refs, "prompts.jsonl")
    message = str(err.value)
    assert "none of the 2 rows have a reference answer (first without: test.jsonl line 1)" in message
    assert "metrics exact_match, contains compare" in message and "words" not in message.split("compare")[0]
    check_references(resolve_metrics(["tsm_user_metrics_d:words"]), no_refs, "prompts.jsonl")  # needs none
    check_references({}, no_refs, "prompts.jsonl")  # generation only
    with pytest.raises(TunesmithError, match="1 of the 2 rows"):
        check_references(resolve_metrics(["exact_match"]), [_example(0), _example(1, None)], "mixed.jsonl")
