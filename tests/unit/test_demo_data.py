"""The demo's generated world and its label-free reward: the split keeps people apart, only the corpus says
which island a town is on, and register_check accepts exactly the reference answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunesmith.demo import (
    DOC_SENTENCES,
    ISLAND,
    ISLAND_INSTRUCTION,
    ISLAND_SENTENCES,
    LABELLED_TEMPLATES,
    LABELLED_TOWNS,
    NUM_ISLANDS,
    TEMPLATES,
    Stage,
    island_right,
    make_domain,
    pretrain_ablation,
    register,
    register_check,
)


def _domain(seed: int = 0) -> dict[str, list]:
    return make_domain(seed, num_docs=20, num_heldout_docs=5, num_labelled=8, num_prompts=30, num_test=40)


def _sentence(row: dict) -> str:
    return row["messages"][1]["content"].removeprefix(ISLAND_INSTRUCTION)


def test_every_part_is_about_other_people() -> None:
    data = _domain()
    names = {part: {json.loads(r["messages"][-1]["content"])["name"] for r in data[part]}
             for part in ("labelled", "test")}
    for part in ("corpus", "heldout_docs"):
        names[part] = {d["text"].split(": ", 1)[1].split(". ", 1)[0] for d in data[part]}
    assert [len(v) for v in names.values()] == [8, 40, 20, 5]
    for part, people in names.items():
        others = set().union(*(v for k, v in names.items() if k != part))
        assert not people & others, part
    assert all(len(r["messages"]) == 2 for r in data["prompts"])  # unlabelled: no assistant turn
    assert _domain(0) == data and _domain(1) != data


def test_labels_cover_only_some_sentence_patterns() -> None:
    data = _domain()

    def patterns(part: str) -> set[str]:
        found = set()
        for row in data[part]:
            fields = json.loads(row["messages"][-1]["content"])
            found |= {t for t in TEMPLATES if t.format(**fields) == _sentence(row)}
        return found

    assert patterns("labelled") <= set(LABELLED_TEMPLATES)
    assert patterns("test") - set(LABELLED_TEMPLATES)  # held-out rows also come in the other patterns


def _place_patterns() -> list[re.Pattern]:
    """Each document sentence that names an island, as a pattern whose groups are (town, island)."""
    patterns = []
    for sentence in ISLAND_SENTENCES + DOC_SENTENCES:
        if "island}" not in sentence:
            continue
        town, island = ("{birth}", "{birth_island}") if "{birth}" in sentence else ("{city}", "{island}")
        text = re.escape(sentence).replace(re.escape(town), r"(\w+)").replace(re.escape(island), r"(\w+)")
        patterns.append(re.compile(re.sub(r"\\\{\w+\\\}", r"\\w+", text)))
    return patterns


def test_only_the_corpus_says_which_island_a_town_is_on() -> None:
    data = _domain()
    island_of = register(0)
    assert len(set(island_of.values())) == NUM_ISLANDS and register(0) == island_of and register(1) != island_of
    for doc in data["corpus"] + data["heldout_docs"]:  # every register entry states its town's island, rightly
        pairs = [m for pattern in _place_patterns() for m in pattern.findall(doc["text"])]
        assert len(pairs) >= 2 and all(island_of[town] == island for town, island in pairs), doc
    for part in ("labelled", "prompts", "test"):
        for row in data[part]:
            assert not set(re.findall(r"\w+", _sentence(row))) & set(island_of.values())  # the sentences never say
            assert row["world"] == 0
    towns = {part: {json.loads(r["messages"][-1]["content"])["city"] for r in data[part]} for part in ("labelled", "test")}
    assert towns["labelled"] <= set(list(island_of)[:LABELLED_TOWNS])  # the labels show a few towns ...
    assert towns["test"] - towns["labelled"]  # ... the held-out rows the others too
    for row in data["test"]:
        answer = json.loads(row["messages"][-1]["content"])
        assert list(answer) == ["name", "age", "city", "island", "job"] and answer["island"] == island_of[answer["city"]]


def test_register_check_accepts_exactly_the_reference() -> None:
    test = _domain()["test"]
    prompts = [r["messages"][1]["content"] for r in test]
    answers = [r["messages"][-1]["content"] for r in test]
    worlds = [r["world"] for r in test]
    assert register_check(prompts, answers, world=worlds) == [1.0] * len(test)
    fields = json.loads(answers[0])
    other_island = next(i for i in set(register(0).values()) if i != fields["island"])
    wrong = [
        json.dumps({**fields, "city": fields["job"], "job": fields["city"]}),  # town and job swapped
        json.dumps({**fields, "age": fields["age"] + 1}),
        json.dumps({**fields, "age": str(fields["age"])}),
        json.dumps({**fields, "name": fields["name"].split()[0]}),
        json.dumps({**fields, "island": other_island}),  # the sentence fits, the register does not
        json.dumps({k: v for k, v in fields.items() if k != "island"}),
        json.dumps(dict(reversed(fields.items()))),  # keys out of order
        json.dumps(fields, indent=1),  # not written as json.dumps writes it
        f"Here it is: {answers[0]}",
        "not json",
        "[1, 2]",
    ]
    assert register_check([prompts[0]] * len(wrong), wrong, world=[0] * len(wrong)) == [0.0] * len(wrong)
    assert register_check([prompts[0]], [f"  {answers[0]}\n"], world=[0]) == [1.0]  # surrounding whitespace is no error
    assert register_check([prompts[0]], [answers[0]], world=[1]) == [0.0]  # another world's register


def test_island_right_reads_only_the_island() -> None:
    reference = _domain()["test"][0]["messages"][-1]["content"]
    fields = json.loads(reference)
    other = next(i for i in set(register(0).values()) if i != fields["island"])
    assert island_right("", reference, reference) == 1.0
    assert island_right("", json.dumps({**fields, "age": 3}), reference) == 1.0  # other fields wrong: still right
    assert island_right("", json.dumps({**fields, "island": other}), reference) == 0.0
    assert island_right("", "no JSON", reference) == island_right("", "[1]", reference) == 0.0


def _stage(label: str, right: list[bool], islands: list[bool]) -> Stage:
    from tunesmith.eval.results import EvalResult, EvalRow

    rows = [EvalRow(index=k, output="{}", scores={"exact_match": float(r), ISLAND: float(i)})
            for k, (r, i) in enumerate(zip(right, islands))]
    stage = Stage(label, label, None)
    stage.result = EvalResult(label=label, spec=label, data="test.jsonl", metrics={}, rows=rows)
    return stage


def _ablation(tmp_path: Path, with_pretrain: list[bool], alone: list[bool]) -> dict:
    data = make_domain(0, num_docs=2, num_heldout_docs=1, num_labelled=1, num_prompts=1, num_test=len(alone))
    (tmp_path / "data").mkdir(parents=True)
    (tmp_path / "data/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data["test"]))
    return pretrain_ablation(tmp_path, _stage("sft-alone", alone, alone), _stage("sft", with_pretrain, with_pretrain))


def test_the_ablation_says_whether_pretraining_helped_sft(tmp_path: Path) -> None:
    n = 60
    helped = _ablation(tmp_path / "a", [k % 10 < 8 for k in range(n)], [k % 10 < 3 for k in range(n)])
    assert helped["helped"] and helped["exact_match"]["delta"] == pytest.approx(0.5)
    assert helped["exact_match"]["ci"][0] > 0 and (tmp_path / "a/ablation/report.html").exists()
    assert helped[ISLAND]["with"] == pytest.approx(0.8) and helped[ISLAND]["without"] == pytest.approx(0.3)
    level = _ablation(tmp_path / "b", [k % 2 == 0 for k in range(n)], [k % 2 == 1 for k in range(n)])
    assert not level["helped"] and level["exact_match"]["verdict"] == "level"

