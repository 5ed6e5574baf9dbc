"""VQA accuracy and answer normalisation against values computed by hand from the official evaluation's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from comp_vlm.data.vqa_eval import evaluate_vqa, normalize_answer, process_punctuation, vqa_accuracy
from comp_vlm.data.vqav2 import read_vqav2_split
from comp_vlm.errors import DataError

VQA = Path(__file__).parent / "fixtures" / "vqav2"


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),  # number words become digits
    ("none", "0"),
    ("ten dogs", "10 dogs"),
    ("The dog.", "dog"),  # articles and a final period go
    ("a an the cat", "cat"),
    ("dont", "don't"),  # contractions are restored
    ("Im", "im"),  # the table's capitalised keys never match lower-cased text
    ("yes!", "yes"),  # '!' touching no space becomes a space, then spaces collapse
    ("t-shirt", "t shirt"),
    ("hi - there", "hi there"),  # a mark touching a space is dropped
    ("1,000", "1000"),  # a comma between digits: every mark is dropped
    ("3.5", "3.5"),  # a period before a digit stays
    ("  left\tside\n", "left side"),
    ("it's", "it's"),  # apostrophes are not punctuation here
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_drops_at_most_32_periods():
    # the official call passes re.UNICODE (= 32) as re.sub's count
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("prediction, answers, expected", [
    ("red", ["red"] * 10, 1.0),
    ("Red.", ["red"] * 10, 1.0),
    ("blue", ["red"] * 10, 0.0),
    # one human: left out once (0), kept in the nine other subsets (1/3 each) -> 9/3/10
    ("maroon", ["red"] * 8 + ["dark red", "maroon"], 0.3),
    # two humans: 2 x (1/3) + 8 x (2/3), over 10
    ("x", ["x", "x"] + ["b"] * 8, 0.6),
    # three humans: 3 x (2/3) + 7 x 1, over 10 -- not 1.0
    ("x", ["x"] * 3 + ["b"] * 7, 0.9),
    ("x", ["x"] * 4 + ["b"] * 6, 1.0),
    ("two", ["2"] * 10, 1.0),
    ("a dog", ["dog"] * 10, 1.0),
    ("dont", ["don't"] * 10, 1.0),
    # human answers that all agree are compared as stored, so a hyphen in them never matches
    ("t-shirt", ["t-shirt"] * 10, 0.0),
    # when they disagree their punctuation is processed too
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),
    # but never their number words
    ("two", ["two"] * 9 + ["three"], 0.0),
])
def test_vqa_accuracy_hand_computed(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(DataError, match="at least one human answer"):
        vqa_accuracy("x", [])


def test_evaluate_vqa_on_the_fixture():
    questions = read_vqav2_split(VQA, "val2014")
    # 42000: 'maroon' said once -> 0.3; 42001: 'one' -> '1', said nine times -> 1.0; 73000: 'no' said once -> 0.3
    result = evaluate_vqa({42000: "maroon", 42001: "one", 73000: "No"}, questions)
    assert result["overall"] == pytest.approx(100 * (0.3 + 1.0 + 0.3) / 3)
    assert result["per_answer_type"] == pytest.approx({"other": 30.0, "number": 100.0, "yes/no": 30.0})
    assert result["per_question_type"] == pytest.approx({"what color is the": 30.0, "how many": 100.0,
                                                         "is the": 30.0})


def test_evaluate_vqa_bad_input():
    questions = read_vqav2_split(VQA, "val2014")
    with pytest.raises(DataError, match="question_id 42001 has no prediction"):
        evaluate_vqa({42000: "red", 73000: "yes"}, questions)
    unannotated = read_vqav2_split(VQA, "test-dev2015", image_dir=VQA / "test2015")
    with pytest.raises(DataError, match="question_id 1000 has no human answers"):
        evaluate_vqa({1000: "x"}, unannotated)
