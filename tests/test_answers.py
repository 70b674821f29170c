"""Option letters from realistic model outputs, option parsing, scoring by category."""

from __future__ import annotations

import pytest

from xattn_video.pipelines.answers import extract_choice, parse_options, score

OPTIONS = parse_options(["A. A man rides a bicycle.", "B. Two dogs.", "C. 3", "D. The red car on the left."])


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("**D**", "D"),
        ("  A\n", "A"),
        ("The answer is (B).", "B"),
        ("The best answer is: C", "C"),
        ("Answer: D", "D"),
        ("answer is b", "B"),
        ("The correct option is B, two dogs.", "B"),
        ("Option C", "C"),
        ("B. Two dogs.", "B"),
        ("(D) The red car on the left", "D"),
        ("C: 3", "C"),
        ("Two dogs", "B"),
        ("It shows the red car on the left.", "D"),
        ("A man rides a bicycle.", "A"),  # option text that starts with the article "A"
        ("I think it is D", "D"),
        ("The answer is B, not A.", "B"),
        ("Options A and C do not fit; the answer is D.", "D"),
        ("The correct option is **C**", "C"),
        ("Answer: The video shows two dogs.", "B"),
        ("the answer is b.", "B"),
    ],
)
def test_extracts_the_option_letter(response, expected):
    assert extract_choice(response, OPTIONS) == expected


@pytest.mark.parametrize(
    "response",
    ["", "   ", "I cannot tell from the video.", "E", "The answer is E", "A or B", "#$%&", "ERROR ERROR",
     "A cat sits there", "The answer is a cat."],
)
def test_garbage_and_ambiguous_responses_give_none(response):
    assert extract_choice(response, OPTIONS) is None


def test_parse_options_letters_and_errors():
    assert parse_options(["A. x", "B. y"]) == [("A", "x"), ("B", "y")]
    assert parse_options(["(A) x", "(B) y"]) == [("A", "x"), ("B", "y")]
    assert parse_options(["red", "blue", "green"]) == [("A", "red"), ("B", "blue"), ("C", "green")]
    with pytest.raises(ValueError, match="at least 2"):
        parse_options(["A. only"])
    with pytest.raises(ValueError, match="order"):
        parse_options(["A. x", "C. y"])
    with pytest.raises(ValueError, match="mix"):
        parse_options(["A. x", "y"])
    with pytest.raises(ValueError, match="empty"):
        parse_options(["A. x", "B. "])


def test_score_by_category():
    records = [
        {"duration": "short", "task_type": "Counting", "correct": True},
        {"duration": "short", "task_type": "OCR", "correct": False},
        {"duration": "long", "task_type": "Counting", "correct": True},
        {"duration": "long", "task_type": "Counting", "correct": False},
        {"duration": "medium", "task_type": "OCR", "correct": None},  # an error: counted apart
    ]
    s = score(records, ("duration", "task_type"))
    assert s["overall"] == {"correct": 2, "total": 4, "accuracy": 0.5}
    assert s["errors"] == 1
    assert s["duration"]["short"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["duration"]["long"]["accuracy"] == 0.5
    assert "medium" not in s["duration"]
    assert s["task_type"]["Counting"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}
    assert s["task_type"]["OCR"] == {"correct": 0, "total": 1, "accuracy": 0.0}
    assert score([], ("duration",))["overall"]["accuracy"] is None
