"""`tunesmith eval` end to end on the tiny model: results.json, perplexity by hand, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import write_jsonl
from tests.helpers import run_config
from tunesmith.cli import main
from tunesmith.config import LoadConfig
from tunesmith.eval.evaluate import evaluate, load_for_eval

ROWS = [{"prompt": f"Say {w} twice", "completion": f"{w} {w}", "id": str(i)}
        for i, w in enumerate(["apple", "river", "stone", "cloud", "lamp", "tiger"])]
BOOM = '''
def boom(prompt, output, reference):
    if "stone" in prompt:
        raise RuntimeError("cannot score stones")
    return 0.5
'''


pytestmark = pytest.mark.usefixtures("one_thread")


def _eval(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_writes_results_and_prints_a_table(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "test.jsonl", ROWS)
    out_dir = tmp_path / "out"
    code, out, _ = _eval(capsys, "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out_dir),
                         "--metrics", "exact_match", "contains", "--max-new-tokens", "6", "--batch-size", "4")
    assert code == 0
    saved = json.loads((out_dir / "results.json").read_text())
    (result,) = saved["results"]
    assert set(result["metrics"]) == {"exact_match", "contains"}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    assert [r["index"] for r in result["rows"]] == list(range(6))
    assert all(isinstance(r["output"], str) and 1 <= r["num_new_tokens"] <= 6 for r in result["rows"])
    assert all(set(r["scores"]) == {"exact_match", "contains"} and not r["errors"] for r in result["rows"])
    assert result["generation"]["max_new_tokens"] == 6 and result["generation"]["batch_size"] == 4
    assert result["timing"]["new_tokens"] == sum(r["num_new_tokens"] for r in result["rows"])
    assert result["timing"]["new_tokens_per_s"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["mean_loss"]))
    assert (result["spec"], result["data"], result["run_dir"]) == (str(tiny_model_dir), str(data), None)
    assert [e["reference"] for e in saved["examples"]] == [r["completion"] for r in ROWS]
    assert saved["examples"][2]["fields"] == {"id": "2"}
    for word in ("exact_match", "contains", "perplexity", "rows", "new tokens/s"):
        assert word in out
    assert out.strip().splitlines()[-1].startswith(f"wrote: {out_dir / 'results.json'}")


def test_perplexity_is_exp_of_the_mean_answer_token_loss(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    code, _, _ = _eval(capsys, "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                       "--metrics", "--max-new-tokens", "1")
    assert code == 0
    (result,) = json.loads((tmp_path / "o/results.json").read_text())["results"]

    # By hand: the trained tokens of a chat sample are the answer and the end-of-turn marker after it.
    model, tokenizer, _ = load_for_eval(str(tiny_model_dir), LoadConfig(), device=torch.device("cpu"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": ROWS[0]["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ROWS[0]["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (seq, vocab)
    losses = F.cross_entropy(logits[len(prompt_ids) - 1 : -1], torch.tensor(answer_ids), reduction="none")
    assert result["mean_loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
    assert result["timing"]["answer_tokens"] == len(answer_ids)
    assert result["metrics"] == {}  # `--metrics` with no names: generation only



def _by_hand_answer_loss(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    """(sum of token losses, tokens) of the answer and its end-of-turn marker after the chat prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]  # (seq, vocab)
    losses = F.cross_entropy(logits[len(prompt_ids) - 1 : -1], torch.tensor(answer_ids), reduction="none")
    return losses.sum().item(), len(answer_ids)


def test_row_losses_add_up_to_the_perplexity(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [*ROWS, {"prompt": "Say nothing"}]  # a row without a reference is not part of the perplexity
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    code, _, _ = _eval(capsys, "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                       "--no-generate", "--batch-size", "4")  # batches of answers of several lengths: padding
    assert code == 0
    (result,) = json.loads((tmp_path / "o/results.json").read_text())["results"]
    saved = result["rows"]
    assert saved[-1]["answer_loss"] is None and saved[-1]["answer_tokens"] == 0

    model, tokenizer, _ = load_for_eval(str(tiny_model_dir), LoadConfig(), device=torch.device("cpu"))
    for row, saved_row in zip(ROWS, saved):
        loss_sum, num_tokens = _by_hand_answer_loss(model, tokenizer, row["prompt"], row["completion"])
        assert saved_row["answer_tokens"] == num_tokens
        assert saved_row["answer_loss"] == pytest.approx(loss_sum / num_tokens, rel=1e-5)
    num_tokens = sum(r["answer_tokens"] for r in saved)
    assert num_tokens == result["timing"]["answer_tokens"]
    total = math.fsum(r["answer_loss"] * r["answer_tokens"] for r in saved[:-1])
    assert total / num_tokens == pytest.approx(result["mean_loss"], rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(total / num_tokens), rel=1e-12)


def test_the_report_gives_perplexity_intervals(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunesmith.data.examples import load_eval_examples
    from tunesmith.eval.report import compare_results, write_report
    from tunesmith.model.generate import GenerationSettings

    examples = load_eval_examples(str(write_jsonl(tmp_path / "test.jsonl", ROWS)))
    model, tokenizer, _ = load_for_eval(str(tiny_model_dir), LoadConfig(), device=torch.device("cpu"))
    # the same model twice: every paired difference of perplexity is exactly zero
    results = [evaluate(model, tokenizer, examples, metrics=[], settings=GenerationSettings(batch_size=4),
                        label=label, spec=str(tiny_model_dir), data="test.jsonl", generate_answers=False)
               for label in ("base", "tuned")]
    (ppl,) = compare_results(results).measures
    base, tuned = ppl.scores["base"], ppl.scores["tuned"]
    assert base.lo < base.value < base.hi and base.value == results[0].perplexity
    assert (tuned.lo, tuned.hi) == (base.lo, base.hi)
    assert (tuned.delta, tuned.delta_lo, tuned.delta_hi, tuned.verdict) == (0.0, 0.0, 0.0, "level")
    page = write_report(results, examples, tmp_path / "report").read_text()
    assert "no interval" not in page and f"95% CI {base.lo:.4g} to {base.hi:.4g}" in page

def test_prompts_without_references(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in ROWS[:3]])
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--max-new-tokens", "2"]
    code, _, err = _eval(capsys, *args, "--metrics", "exact_match", "json_equal")
    assert code == 2
    assert "none of the 3 rows have a reference answer" in err and "exact_match, json_equal compare" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()  # refused before anything ran
    code, out, _ = _eval(capsys, *args)  # no metrics asked: generation still runs
    assert code == 0
    (result,) = json.loads((tmp_path / "o/results.json").read_text())["results"]
    assert result["perplexity"] is None and result["metrics"] == {}
    assert all(isinstance(r["output"], str) for r in result["rows"])


def test_a_raising_metric_is_reported_and_the_others_complete(
    tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tsm_eval_boom.py").write_text(BOOM)
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "test.jsonl", ROWS)
    code, out, err = _eval(capsys, "--model", str(tiny_model_dir), "--data", str(data), "--out", "o",
                           "--metrics", "exact_match", "tsm_eval_boom:boom", "--max-new-tokens", "2")
    assert code == 2
    assert "tsm_eval_boom:boom: failed on 1 of 6 rows" in err
    assert "row 2 (" in err and "test.jsonl line 3): tsm_eval_boom.boom raised RuntimeError: cannot score stones" in err
    assert "Traceback" not in err
    (result,) = json.loads((tmp_path / "o/results.json").read_text())["results"]
    assert result["metrics"]["tsm_eval_boom:boom"] == 0.5 and "exact_match" in result["metrics"]
    assert [r["scores"]["tsm_eval_boom:boom"] for r in result["rows"]] == [0.5, 0.5, None, 0.5, 0.5, 0.5]
    assert all(r["scores"]["exact_match"] is not None for r in result["rows"])
    assert "failed on 1 of 6 rows" in out  # in the table too


def test_an_unloadable_model_gives_the_same_error_as_train(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "test.jsonl", ROWS)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no weights
    for model in (str(tmp_path / "no-such-model"), str(broken)):
        config = tmp_path / "train.yaml"
        config.write_text(yaml.safe_dump(run_config(Path(model), data, tmp_path / "run")))
        assert main(["train", str(config)]) == 2
        train_err = capsys.readouterr().err
        code, _, err = _eval(capsys, "--model", model, "--data", str(data))
        assert code == 2 and err == train_err and "Traceback" not in err


def test_a_run_folder_loads_merged_then_adapter(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import tunesmith

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run_dir = tmp_path / "run"
    config = run_config(tiny_model_dir, data, run_dir, max_steps=2)
    config["data"]["eval"] = str(data)
    summary = tunesmith.train(config).summary()
    capsys.readouterr()
    ids = torch.tensor([[1, 40, 77, 120, 3]])
    merged, _, found = load_for_eval(str(run_dir), LoadConfig(), device=torch.device("cpu"))
    assert found == str(run_dir)
    shutil.move(run_dir / "merged", tmp_path / "merged-aside")
    adapted, tokenizer, _ = load_for_eval(str(run_dir), LoadConfig(), device=torch.device("cpu"))
    base, _, _ = load_for_eval(str(tiny_model_dir), LoadConfig(), device=torch.device("cpu"))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, adapted, base))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapter did change the model
    assert tokenizer.chat_template
    code, _, _ = _eval(capsys, "--model", str(run_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                       "--max-new-tokens", "2", "--limit", "2")
    assert code == 0
    (result,) = json.loads((tmp_path / "o/results.json").read_text())["results"]
    assert result["run_dir"] == str(run_dir) and len(result["rows"]) == 2
    code, _, _ = _eval(capsys, "--model", str(run_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                       "--no-generate")
    (result,) = json.loads((tmp_path / "o/results.json").read_text())["results"]
    assert result["mean_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)  # the loss training reported


def test_held_out_text_perplexity_by_hand(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """--text: each document's mean loss is the model's next-token loss over BOS + text + EOS, computed here
    directly, one document per forward pass; the perplexity is over all their tokens."""
    data = write_jsonl(tmp_path / "test.jsonl", ROWS)
    texts = ["apple river stone", "the cloud over the lamp is a tiger", "stone"]
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    code, out, _ = _eval(capsys, "--model", str(tiny_model_dir), "--data", str(data), "--text", str(docs),
                         "--no-generate", "--out", str(tmp_path / "out"))
    assert code == 0
    (result,) = json.loads((tmp_path / "out/results.json").read_text())["results"]
    model, tokenizer, _ = load_for_eval(str(tiny_model_dir), LoadConfig())
    by_hand = []
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            by_hand.append((F.cross_entropy(logits, torch.tensor(ids[1:])).item(), len(ids) - 1))
    assert [n for _, n in result["text_losses"]] == [n for _, n in by_hand]
    assert [x for x, _ in result["text_losses"]] == pytest.approx([x for x, _ in by_hand], rel=1e-5)
    mean = sum(x * n for x, n in by_hand) / sum(n for _, n in by_hand)
    assert result["text_perplexity"] == pytest.approx(math.exp(mean), rel=1e-5) and result["text_data"] == str(docs)
    assert f"held-out text perplexity    {result['text_perplexity']:>12.4f}  (3 documents of {docs}" in out
