"""The demo's generated world and its label-free reward: the split keeps people apart, and sentence_check
accepts exactly the reference answers."""

from __future__ import annotations

import json

from tunesmith.demo import INSTRUCTION, LABELLED_TEMPLATES, TEMPLATES, make_domain, sentence_check


def _domain(seed: int = 0) -> dict[str, list]:
    return make_domain(seed, num_docs=20, num_heldout_docs=5, num_labelled=8, num_prompts=30, num_test=40)


def _sentence(row: dict) -> str:
    return row["messages"][1]["content"].removeprefix(INSTRUCTION)


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


def test_sentence_check_accepts_exactly_the_reference() -> None:
    test = _domain()["test"]
    prompts = [r["messages"][1]["content"] for r in test]
    answers = [r["messages"][-1]["content"] for r in test]
    assert sentence_check(prompts, answers) == [1.0] * len(test)
    fields = json.loads(answers[0])
    wrong = [
        json.dumps({**fields, "city": fields["job"], "job": fields["city"]}),  # town and job swapped
        json.dumps({**fields, "age": fields["age"] + 1}),
        json.dumps({**fields, "age": str(fields["age"])}),
        json.dumps({**fields, "name": fields["name"].split()[0]}),
        json.dumps(dict(reversed(fields.items()))),  # keys out of order
        json.dumps(fields, indent=1),  # not written as json.dumps writes it
        f"Here it is: {answers[0]}",
        "not json",
        "[1, 2]",
    ]
    assert sentence_check([prompts[0]] * len(wrong), wrong) == [0.0] * len(wrong)
    assert sentence_check([prompts[0]], [f"  {answers[0]}\n"]) == [1.0]  # surrounding whitespace is no error
