"""The demo is a claim: run its whole pipeline on the default model at a fixed seed and check that every stage
improved on the one before it, each on its own measure, with a paired 95% interval that excludes zero, and that
pretraining helped the later stages (SFT after it against the same SFT without it, `--ablate-pretrain`).

It also stands for the GRPO run on the default model (rollouts, a module:function reward, the logged
measures, samples.jsonl), which a separate slow test used to check on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith import demo


@pytest.mark.slow
def test_demo_every_stage_improves_on_the_one_before(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    check_demo(out, demo.main(["--out", str(out), "--seed", "0", "--ablate-pretrain"]))


def check_demo(out: Path, code: int) -> None:
    """The claims of one finished demo run in `out` that exited with `code`."""
    table = {row["stage"]: row for row in json.loads((out / "stages.json").read_text())["stages"]}
    assert list(table) == ["base", "pretrain", "sft", "grpo"]
    ppl = table["pretrain"][demo.DOMAIN_PPL + "_delta"]
    assert ppl["delta"] < 0 and ppl["ci"][1] < 0, ppl  # pretraining lowered held-out domain perplexity
    for stage in ("sft", "grpo"):
        em = table[stage]["exact_match_delta"]
        assert em["delta"] > 0 and em["ci"][0] > 0, (stage, em)
    assert all(table[s]["helped"] for s in ("pretrain", "sft", "grpo")) and code == 0
    assert table["grpo"]["exact_match"] > table["sft"]["exact_match"] > table["base"]["exact_match"]

    # pretraining helped SFT: the facts only the corpus holds (which island a town is on) reach its answers
    ablation = json.loads((out / "stages.json").read_text())["ablation"]
    for key in ("exact_match", demo.ISLAND):
        assert ablation[key]["delta"] > 0 and ablation[key]["ci"][0] > 0, (key, ablation[key])
    assert ablation["helped"] and (out / "ablation/report.html").exists()
    assert table["sft"]["island_right"] == pytest.approx(ablation[demo.ISLAND]["with"])

    # the report reads the same chain
    comparison = json.loads((out / "report/results.json").read_text())["comparison"]
    assert comparison["chain"] is True
    grpo = comparison["measures"]["exact_match"]["models"]["grpo"]
    assert grpo["previous"] == "sft" and grpo["step_delta"] == pytest.approx(table["grpo"]["exact_match_delta"]["delta"])
    text = comparison["measures"]["text_perplexity"]["models"]["pretrain"]  # the held-out documents, in the report
    assert text["step_verdict"] == "better" and text["value"] == pytest.approx(table["pretrain"][demo.DOMAIN_PPL])
    assert "heldout_docs.jsonl</code>" in (out / "report/report.html").read_text()

    # the GRPO run logged its rollouts, rewarded by the demo's module:function verifier
    steps = [json.loads(x) for x in (out / "grpo/metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "reward" in s]
    assert steps and "kl" not in steps[0]  # no KL penalty: no reference pass, and no KL to log
    assert {"reward/tunesmith.demo:register_check", "entropy", "completion_length"} <= set(steps[0])
    samples = [json.loads(x) for x in (out / "grpo/samples.jsonl").read_text().splitlines()]
    assert samples and all("completion" in s for s in samples)
