"""The report of a chain of stages (base -> stage 1 -> stage 2 ...) from hand-built results: each stage's paired
change from the one before it, its verdict, the headline per stage, the table's columns and `compare --chain`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunesmith.data.examples import EvalExample
from tunesmith.errors import TunesmithError
from tunesmith.eval.report import compare_results, write_report
from tunesmith.eval.results import EvalResult, EvalRow

NUM_ROWS = 40
# Rows each stage gets right: every stage keeps the rows of the one before it except where noted.
RIGHT = {
    "base": set(range(0, 4)),  # 10%
    "pretrain": set(range(0, 5)),  # 12.5%: one row more, within noise
    "sft": set(range(0, 24)),  # 60%: +47.5 points
    "grpo": set(range(0, 36)),  # 90%: +30 points
    "dpo": set(range(0, 30)),  # 75%: -15 points, six rows lost
}
LOSS = {"base": 2.0, "pretrain": 1.5, "sft": 0.5, "grpo": 0.45, "dpo": 0.45}  # per-row mean answer loss


def _rows(label: str) -> list[EvalRow]:
    # the loss varies a little per row, so the perplexity's interval has width
    return [EvalRow(index=i, output="{}", scores={"exact_match": float(i in RIGHT[label])},
                    answer_loss=LOSS[label] + 0.01 * (i % 5), answer_tokens=10) for i in range(NUM_ROWS)]


def _result(label: str) -> EvalResult:
    rows = _rows(label)
    loss = sum(r.answer_loss for r in rows) / len(rows)
    return EvalResult(label=label, spec=f"runs/{label}", data="test.jsonl",
                      metrics={"exact_match": len(RIGHT[label]) / NUM_ROWS}, rows=rows, perplexity=math.exp(loss),
                      mean_loss=loss, generation={"max_new_tokens": 8, "temperature": 0.0})


def _chain(*labels: str) -> list[EvalResult]:
    return [_result(label) for label in labels]


def test_each_stage_is_measured_against_the_one_before() -> None:
    c = compare_results(_chain("base", "pretrain", "sft", "grpo", "dpo"), chain=True)
    em = c.measures[0].scores
    assert [em[k].previous for k in ("pretrain", "sft", "grpo", "dpo")] == ["base", "pretrain", "sft", "grpo"]
    assert em["base"].previous is None and em["base"].step_delta is None
    assert em["sft"].step_delta == pytest.approx(0.475) and em["sft"].delta == pytest.approx(0.5)
    assert em["grpo"].step_delta == pytest.approx(0.30) and em["grpo"].delta == pytest.approx(0.8)
    assert em["dpo"].step_delta == pytest.approx(-0.15)
    assert [em[k].step_verdict for k in ("pretrain", "sft", "grpo", "dpo")] == ["level", "better", "better", "worse"]
    # only one row changed from base to pretrain: its interval holds zero; sft's and grpo's exclude it
    assert em["pretrain"].step_lo <= 0 <= em["pretrain"].step_hi
    assert 0 < em["sft"].step_lo < 0.475 < em["sft"].step_hi and 0 < em["grpo"].step_lo < 0.3 < em["grpo"].step_hi
    assert em["dpo"].step_hi < 0
    ppl = next(m for m in c.measures if m.name == "perplexity").scores
    assert ppl["pretrain"].step_delta == pytest.approx(ppl["pretrain"].value - ppl["base"].value)
    assert ppl["pretrain"].step_verdict == "better" and ppl["pretrain"].step_hi < 0
    assert ppl["dpo"].step_delta == pytest.approx(0.0) and ppl["dpo"].step_verdict == "level"


def test_without_chain_nothing_is_measured_step_by_step() -> None:
    c = compare_results(_chain("base", "pretrain", "sft"))
    assert all(s.step_delta is None and s.previous is None for m in c.measures for s in m.scores.values())
    assert not c.chain


def test_headline_says_what_each_stage_added() -> None:
    lines = compare_results(_chain("base", "pretrain", "sft", "grpo", "dpo"), chain=True).headline
    assert len(lines) == 5
    assert lines[0].startswith("pretrain did not change exact match beyond noise after base: +2.5 points")
    assert "Perplexity of the reference answers down: " in lines[0]
    assert lines[1].startswith("sft added +47.5 points on exact match to pretrain (95% CI +")
    assert ": 12.5% -> 60.0%." in lines[1]
    assert lines[2].startswith("grpo added +30.0 points on exact match to sft")
    assert lines[3].startswith("dpo lost -15.0 points on exact match from grpo (95% CI -")
    assert lines[4].startswith("Overall: dpo beats base on exact match by +65.0 points")


def test_a_chain_must_start_at_its_base() -> None:
    with pytest.raises(ValueError, match="a chain starts at its base"):
        compare_results(_chain("sft", "base"), chain=True)


def test_report_files_carry_the_steps(tmp_path: Path) -> None:
    results = _chain("base", "sft", "grpo")
    examples = [EvalExample(index=i, location=f"test.jsonl line {i + 1}", messages=[{"role": "user", "content": "q"}],
                            reference="{}", prompt="q") for i in range(NUM_ROWS)]
    page = write_report(results, examples, tmp_path, chain=True, title="chain").read_text()
    data = json.loads((tmp_path / "results.json").read_text())["comparison"]
    assert data["chain"] is True
    grpo = data["measures"]["exact_match"]["models"]["grpo"]
    assert grpo["previous"] == "sft" and grpo["step_delta"] == pytest.approx(0.3) and grpo["step_verdict"] == "better"
    assert "step_delta" not in data["measures"]["exact_match"]["models"]["base"]
    head = page.split('id="scores"', 1)[1].split("</thead>", 1)[0]
    # each stage against the one before it, then the later stages against the base (the first's step is that)
    columns = [c.split("<", 1)[0] for c in head.split("&Delta; ")[1:]]
    assert columns == ["sft &minus; base", "grpo &minus; sft", "grpo &minus; base"]
    assert head.count("this stage&rsquo;s gain") == 2


def test_compare_chain_refuses_a_base_that_is_not_first(tmp_path: Path) -> None:
    from tunesmith.config import LoadConfig
    from tunesmith.eval.compare import compare
    from tunesmith.model.generate import GenerationSettings

    with pytest.raises(TunesmithError, match="--chain: the stages start at the base 'base'"):
        compare({"sft": "runs/sft", "base": "default"}, "test.jsonl", tmp_path, metrics=["exact_match"],
                settings=GenerationSettings(), load=LoadConfig(), chain=True)


# Held-out text (compare --text): per document mean loss; pretraining lowers it, the later stages barely move it
TEXT_LOSS = {"base": 3.2, "pretrain": 1.4, "sft": 1.45, "grpo": 1.45}
NUM_DOCS = 12


def _with_text(label: str) -> EvalResult:
    result = _result(label)
    result.text_data = "heldout_docs.jsonl"
    result.text_losses = [[TEXT_LOSS[label] + 0.05 * (k % 3), 20.0 + k] for k in range(NUM_DOCS)]
    tokens = sum(n for _, n in result.text_losses)
    result.text_perplexity = math.exp(sum(x * n for x, n in result.text_losses) / tokens)
    return result


def test_held_out_text_perplexity_is_a_measure_of_the_chain(tmp_path: Path) -> None:
    results = [_with_text(label) for label in ("base", "pretrain", "sft", "grpo")]
    c = compare_results(results, chain=True)
    text = next(m for m in c.measures if m.name == "text_perplexity")
    assert not text.higher_is_better and c.measures[0].name == "exact_match"  # the primary metric stays first
    s = text.scores["pretrain"]
    assert s.value == pytest.approx(results[1].text_perplexity) and s.num_rows == NUM_DOCS
    assert s.step_delta == pytest.approx(results[1].text_perplexity - results[0].text_perplexity)
    assert s.step_verdict == "better" and s.step_hi < 0 and s.lo < s.value < s.hi
    assert text.scores["sft"].step_verdict == "worse"  # every document's loss rose by 0.05: paired, that is not noise
    assert text.scores["grpo"].step_delta == pytest.approx(0.0) and text.scores["grpo"].step_verdict == "level"
    assert "Perplexity of the held-out text down: 25.8 -> 4.27 (lower is better, 95% CI of the change -" in c.headline[0]

    page = write_report(results, [EvalExample(index=i, location=f"test.jsonl line {i + 1}", reference="{}", prompt="q",
                                              messages=[{"role": "user", "content": "q"}]) for i in range(NUM_ROWS)],
                        tmp_path, chain=True, title="chain").read_text()
    assert "and on the perplexity of 12 held-out documents of <code>heldout_docs.jsonl</code>" in page
    assert "<th scope=\"row\">held-out text perplexity" in page
    assert (tmp_path / "text_perplexity.png").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["comparison"]["measures"]["text_perplexity"]["models"]["pretrain"]["step_verdict"] == "better"
    assert EvalResult.from_dict(saved["results"][1]).text_losses == results[1].text_losses


def test_the_legend_explains_only_the_perplexities_measured(tmp_path: Path) -> None:
    results = [_with_text(label) for label in ("base", "pretrain")]
    for r in results:  # answers scored, their reference answers' perplexity not measured (`eval --no-perplexity`)
        r.perplexity = r.mean_loss = None
        for row in r.rows:
            row.answer_loss, row.answer_tokens = None, 0
    examples = [EvalExample(index=i, location=f"test.jsonl line {i + 1}", reference="{}", prompt="q",
                            messages=[{"role": "user", "content": "q"}]) for i in range(NUM_ROWS)]
    page = write_report(results, examples, tmp_path / "text", chain=True, title="chain").read_text()
    assert "Perplexity is that of the reference answers" not in page and "Held-out text perplexity is" in page
    page = write_report(_chain("base", "sft"), examples, tmp_path / "answers", title="t").read_text()
    assert "Perplexity is that of the reference answers" in page and "Held-out text perplexity is" not in page


def test_results_without_held_out_text_have_no_such_measure() -> None:
    c = compare_results(_chain("base", "sft"), chain=True)
    assert [m.name for m in c.measures] == ["exact_match", "perplexity"]
