"""The report from hand-built results: numbers, deltas, row order, escaping, self-contained HTML."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from tunesmith.data.examples import EvalExample
from tunesmith.eval.report import CONFIDENCE, NUM_BOOTSTRAP, SEED, compare_results, headline, write_report
from tunesmith.eval.results import EvalResult, EvalRow, write_results
from tunesmith.eval.stats import perplexity_ci

NUM_ROWS = 16
BASE_RIGHT = {0, 4, 8, 12}  # base: 4/16 = 25% exact match
TUNED_WRONG = {3, 11}  # tuned: 14/16 = 87.5%, wrong on a row base also misses


def _reference(i: int) -> str:
    return json.dumps({"name": f"person{i}", "age": 20 + i})


def build_examples() -> list[EvalExample]:
    """Sixteen rows; row 5's prompt and reference carry HTML that must not become markup."""
    examples = []
    for i in range(NUM_ROWS):
        prompt = f"Extract name and age: person{i} is {20 + i}."
        if i == 5:
            prompt += ' <script>alert("x")</script> & <img src=x onerror=alert(1)>'
        examples.append(EvalExample(index=i, location=f"test.jsonl line {i + 1}",
                                    messages=[{"role": "user", "content": prompt}],
                                    reference=_reference(i), prompt=prompt))
    return examples


def _result(label: str, rows: list[EvalRow], perplexity: float, run_dir: Path | None = None) -> EvalResult:
    names = {k for r in rows for k in r.scores}
    metrics = {k: sum(r.scores[k] for r in rows) / len(rows) for k in sorted(names, reverse=True)}
    return EvalResult(label=label, spec=f"models/{label}", data="data/test.jsonl", metrics=metrics, rows=rows,
                      perplexity=perplexity, mean_loss=None, generation={"max_new_tokens": 64, "temperature": 0.0},
                      timing={"seconds": 1.5, "new_tokens_per_s": 40.0},
                      run_dir=str(run_dir) if run_dir else None)


def build_results(run_dir: Path | None = None, third: bool = False) -> list[EvalResult]:
    """base (25% exact match), tuned (87.5%), and optionally a third model named with HTML characters."""
    base_rows, tuned_rows = [], []
    for i in range(NUM_ROWS):
        ok = i in BASE_RIGHT
        base_rows.append(EvalRow(index=i, output=_reference(i) if ok else f"I think it is person{i} <b>",
                                 scores={"exact_match": float(ok), "contains": float(ok or i == 1)}))
        ok = i not in TUNED_WRONG
        tuned_rows.append(EvalRow(index=i, output=_reference(i) if ok else "{}",
                                  scores={"exact_match": float(ok), "contains": float(ok or i == 3)}))
    results = [_result("base", base_rows, 14.0), _result("tuned", tuned_rows, 2.0, run_dir)]
    if third:
        rows = [EvalRow(index=r.index, output=r.output, scores=dict(r.scores)) for r in base_rows]
        results.append(_result("<odd> & name", rows, 13.0))
    return results


def write_run_metrics(run_dir: Path) -> Path:
    """A run folder's metrics.jsonl with a falling train loss and two eval points."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 31)]
    lines += [{"step": 15, "eval_loss": 0.5, "eval_ppl": 1.6}, {"step": 30, "eval_loss": 0.3, "eval_ppl": 1.3}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 31, "lo')
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    results = build_results(write_run_metrics(tmp / "run"))
    return write_report(results, build_examples(), tmp / "out", title="tiny <test> & report")


def _section(page: str, table_id: str) -> str:
    return page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]


def test_writes_json_plots_and_one_html(report: Path) -> None:
    names = sorted(p.name for p in report.parent.iterdir())
    assert names == ["loss_tuned.png", "metrics.png", "perplexity.png", "report.html", "results.json"]
    for png in report.parent.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_holds_every_number(report: Path) -> None:
    data = json.loads((report.parent / "results.json").read_text())
    assert set(data) == {"results", "examples", "comparison"}
    assert [r["label"] for r in data["results"]] == ["base", "tuned"]
    assert len(data["results"][1]["rows"]) == NUM_ROWS and len(data["examples"]) == NUM_ROWS
    rebuilt = EvalResult.from_dict(data["results"][1])
    assert rebuilt.rows[3].scores["exact_match"] == 0.0
    em = data["comparison"]["measures"]["exact_match"]["models"]
    assert em["base"]["value"] == pytest.approx(0.25) and em["tuned"]["value"] == pytest.approx(0.875)
    assert em["tuned"]["delta"] == pytest.approx(0.625)
    lo, hi = em["tuned"]["delta_ci"]
    assert 0 < lo < 0.625 < hi <= 1 and em["tuned"]["verdict"] == "better"
    ppl = data["comparison"]["measures"]["perplexity"]
    assert ppl["higher_is_better"] is False and ppl["models"]["tuned"]["delta"] == pytest.approx(-12.0)
    assert data["comparison"]["disagreements"] == [1, 2, 3, 5, 6, 7, 9, 10, 13, 14, 15]


def test_headline_first_in_one_sentence(report: Path) -> None:
    text = headline(build_results(), "base")
    assert re.match(r"tuned beats base on exact match by \+62\.5 points \(95% CI \+\d+\.\d to \+\d+\.\d\): "
                    r"87\.5% vs 25\.0% on 16 rows\.", text), text
    assert "lower is better" in text
    page = report.read_text()
    assert page.index('id="headline"') < page.index('id="scores"') < page.index('id="examples"')
    assert "tuned beats base on exact match by +62.5 points" in page


def test_scores_table_has_values_deltas_and_intervals(report: Path) -> None:
    table = _section(report.read_text(), "scores")
    em_row = table.split("exact match", 1)[1].split("</tr>", 1)[0]
    assert "25.0%" in em_row and "87.5%" in em_row and "+62.5 points" in em_row
    assert em_row.count("95% CI") == 3  # base, tuned and the delta
    assert 'class="num better"' in em_row
    ppl_row = table.split("perplexity", 1)[1].split("</tr>", 1)[0]
    assert "lower is better" in ppl_row and "14" in ppl_row and "-12" in ppl_row


def test_disagreeing_rows_come_first(report: Path) -> None:
    order = [int(i) for i in re.findall(r'data-row="(\d+)"', _section(report.read_text(), "examples"))]
    assert sorted(order) == list(range(NUM_ROWS))
    disagree = [1, 2, 3, 5, 6, 7, 9, 10, 13, 14, 15]
    assert order == disagree + [0, 4, 8, 11, 12]


def test_user_strings_are_escaped(report: Path) -> None:
    page = report.read_text()
    assert "<script" not in page and "onerror=alert" not in page.replace("&lt;img src=x onerror=alert", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in page
    assert "I think it is person2 &lt;b&gt;" in page
    assert "<title>tiny &lt;test&gt; &amp; report</title>" in page


def test_images_are_embedded_and_nothing_is_fetched(report: Path) -> None:
    page = report.read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == 3  # metric bars, perplexity bars, tuned's loss curves
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may hold "//"
    assert not re.search(r"https?://|//[a-z]|<link|<script|@import|url\(", text, flags=re.IGNORECASE)
    assert re.search(r'href="', text) is None


def test_more_models_share_the_same_tables(tmp_path: Path) -> None:
    path = write_report(build_results(third=True), build_examples(), tmp_path)
    page = path.read_text()
    assert page.count('id="scores"') == 1 and page.count('id="examples"') == 1
    head = _section(page, "scores").split("</thead>", 1)[0]
    assert "&lt;odd&gt; &amp; name" in head and "&Delta; tuned" in head and "&Delta; &lt;odd&gt; &amp; name" in head
    assert "&lt;odd&gt; &amp; name" in _section(page, "examples").split("</thead>", 1)[0]
    # the third model equals base on every row, so it is level, not better
    cmp = compare_results(build_results(third=True))
    assert cmp.measures[0].scores["<odd> & name"].verdict == "level"
    assert "<odd> & name and base score the same on exact match on every row" in headline(build_results(third=True))
    assert "Training" not in page  # no model came from a run folder


def test_base_must_be_among_the_results() -> None:
    with pytest.raises(ValueError, match="base model 'missing'"):
        compare_results(build_results(), "missing")


def test_a_worse_model_is_called_worse() -> None:
    # read the other way round: base (25%) against tuned (87.5%) as its reference
    text = headline(build_results(), "tuned")
    assert text.startswith("base is worse than tuned on exact match by -62.5 points (95% CI -")


def test_a_small_difference_is_level_within_noise() -> None:
    base, tuned = build_results()
    for row in tuned.rows:  # tuned = base, plus one more row right: 5/16 vs 4/16
        row.scores["exact_match"] = base.rows[row.index].scores["exact_match"]
    tuned.rows[1].scores["exact_match"] = 1.0
    tuned.metrics["exact_match"] = 5 / 16
    text = headline([base, tuned])
    assert text.startswith("tuned and base are level on exact match within noise: +6.2 points (95% CI +0.0 to"), text


def with_answer_losses(results: list[EvalResult]) -> list[EvalResult]:
    """Give every row a reference-answer loss, and each model the perplexity those losses add up to."""
    for k, result in enumerate(results):
        for row in result.rows:
            row.answer_tokens = 3 + row.index % 5
            row.answer_loss = (2.6 if k == 0 else 0.7) + 0.04 * (row.index % 7)
        total = math.fsum(row.answer_loss * row.answer_tokens for row in result.rows)
        result.mean_loss = total / sum(row.answer_tokens for row in result.rows)
        result.perplexity = math.exp(result.mean_loss)
    return results


def test_perplexity_interval_comes_from_the_row_losses() -> None:
    results = with_answer_losses(build_results())
    ppl = next(m for m in compare_results(results).measures if m.name == "perplexity")
    for result in results:
        s = ppl.scores[result.label]
        losses = [row.answer_loss for row in result.rows]
        tokens = [row.answer_tokens for row in result.rows]
        assert (s.lo, s.hi) == perplexity_ci(losses, tokens, num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE,
                                             seed=SEED)
        assert s.lo < s.value < s.hi and s.num_rows == NUM_ROWS
    base, tuned = results
    tuned_score = ppl.scores["tuned"]
    assert tuned_score.delta == pytest.approx(tuned.perplexity - base.perplexity)
    assert tuned_score.delta_lo < tuned_score.delta < tuned_score.delta_hi < 0
    assert tuned_score.verdict == "better"
    assert ", 95% CI of the change -" in headline(results)


def test_identical_row_losses_give_a_zero_delta_interval() -> None:
    base, tuned = with_answer_losses(build_results())
    for b, t in zip(base.rows, tuned.rows):
        t.answer_loss, t.answer_tokens = b.answer_loss, b.answer_tokens
    tuned.perplexity = base.perplexity
    s = next(m for m in compare_results([base, tuned]).measures if m.name == "perplexity").scores["tuned"]
    assert (s.delta, s.delta_lo, s.delta_hi, s.verdict) == (0.0, 0.0, 0.0, "level")


def test_rows_without_a_reference_are_not_part_of_the_interval() -> None:
    base, tuned = with_answer_losses(build_results())
    for result in (base, tuned):  # row 0 had no reference: no loss, not in the perplexity
        result.rows[0].answer_loss, result.rows[0].answer_tokens = None, 0
    s = next(m for m in compare_results([base, tuned]).measures if m.name == "perplexity").scores["base"]
    rows = base.rows[1:]
    assert (s.lo, s.hi) == perplexity_ci([r.answer_loss for r in rows], [r.answer_tokens for r in rows],
                                         num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED)


def test_report_shows_the_perplexity_intervals(tmp_path: Path) -> None:
    results = with_answer_losses(build_results())
    path = write_report(results, build_examples(), tmp_path)
    ppl_row = _section(path.read_text(), "scores").split("perplexity", 1)[1].split("</tr>", 1)[0]
    assert ppl_row.count("95% CI") == 3 and "no interval" not in ppl_row  # base, tuned and the delta
    assert 'class="num better"' in ppl_row
    assert "Perplexity has no interval" not in path.read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    row = data["results"][1]["rows"][2]
    assert (row["answer_loss"], row["answer_tokens"]) == (results[1].rows[2].answer_loss, 5)
    assert EvalResult.from_dict(data["results"][1]).rows[2].answer_tokens == 5
    lo, hi = data["comparison"]["measures"]["perplexity"]["models"]["tuned"]["delta_ci"]
    assert lo < hi < 0


def test_one_writer_for_results_json(tmp_path: Path) -> None:
    base, tuned = build_results()
    tuned.rows[0].scores["exact_match"] = float("nan")
    path = write_results(tmp_path / "eval", [tuned], build_examples())  # as `tunesmith eval` writes it
    assert path == tmp_path / "eval" / "results.json" and [p.name for p in path.parent.iterdir()] == ["results.json"]
    data = json.loads(path.read_text())  # strict JSON: NaN was written as null
    assert set(data) == {"results", "examples"} and data["results"][0]["rows"][0]["scores"]["exact_match"] is None
    write_report([base, tuned], build_examples(), tmp_path / "report")  # the report adds its comparison
    assert set(json.loads((tmp_path / "report" / "results.json").read_text())) == {"results", "examples", "comparison"}
