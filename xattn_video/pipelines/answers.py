"""Multiple-choice answers: the option letter in a model's free text, and accuracy by category.

:func:`extract_choice` reads what chat models actually write: a letter alone (``B``, ``(B)``, ``B.``), a
sentence (``The answer is (B).``, ``Answer: B``, ``The best answer is B, the dog``), an option's text with
or without its letter (``B. a dog``, ``a dog``). It returns None for text that names no option or names
several without saying which is the answer; None is scored as wrong, never guessed.

:func:`score` tallies records overall and by any fields (duration, task type, domain).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["extract_choice", "normalize_text", "parse_options", "score"]

_LETTER_PREFIX = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]]?\s*[\.\):：]\s*(.*)$", re.S)
_LETTER_PREFIX_LOOSE = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]]\s*(.*)$", re.S)
# A cue, then a letter standing alone: "answer is B", "Answer: (B)", "correct option is **C**", "option D".
# Capital letters always; a lower-case one only before punctuation or the end ("answer is b." but not the
# article in "the answer is a man ...").
_LETTER = r"[\(\[\*]*((?-i:[A-Z])|[a-z](?=[\)\]\*]*\s*(?:$|[\.,;:!\)\]])))[\)\]\*]*(?![A-Za-z])"
_LINK = r"\s*(?:is|would\s+be|should\s+be|:|：|=)?\s*[:：]?\s*"
_ANSWER_CUE = re.compile(r"(?:answer|correct\s+(?:one|option|choice))" + _LINK + _LETTER, re.I)
_OPTION_CUE = re.compile(r"(?:option|choice)" + _LINK + _LETTER, re.I)


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped, runs of spaces collapsed: for matching option texts."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_options(options: Sequence[str]) -> list[tuple[str, str]]:
    """Options as (letter, text): ``"A. a cat"`` gives ("A", "a cat"); options without a letter prefix are
    lettered A, B, C, ... in order. Raises ValueError for fewer than two options, an empty option, letters
    out of order or repeated."""
    items = [str(o) for o in options]
    if len(items) < 2:
        raise ValueError(f"a multiple-choice question needs at least 2 options, got {len(items)}")
    parsed = [_LETTER_PREFIX.match(o) for o in items]
    if all(parsed):
        pairs = [(m.group(1), m.group(2).strip()) for m in parsed]
    elif not any(parsed):
        pairs = [(chr(ord("A") + i), o.strip()) for i, o in enumerate(items)]
    else:
        raise ValueError(f"options mix lettered and unlettered entries: {items!r}")
    letters = [letter for letter, _ in pairs]
    expected = [chr(ord("A") + i) for i in range(len(pairs))]
    if letters != expected:
        raise ValueError(f"option letters must be {expected} in order, got {letters}")
    if any(not text for _, text in pairs):
        raise ValueError(f"an option is empty: {items!r}")
    return pairs


def extract_choice(response: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The option letter a response gives, or None (see the module docstring)."""
    letters = [letter for letter, _ in options]
    valid = set(letters)
    text = (response or "").strip()
    if not text:
        return None
    # 1. the whole response is a letter, possibly bracketed or followed by punctuation: "B", "(B)", "B."
    bare = re.fullmatch(r"[\(\[\*]*([A-Z])[\)\]\*]*[\.\):：]?", text)
    if bare:
        return bare.group(1) if bare.group(1) in valid else None
    # 2. a cue phrase: "The answer is (B)", "Answer: B", "option B"
    for cue in (_ANSWER_CUE, _OPTION_CUE):  # "Options A and C are wrong, the answer is B": the answer wins
        for m in cue.finditer(text):
            letter = m.group(1).upper()
            if letter in valid:
                return letter
    # 3. the response starts with a lettered option: "B. a dog", "(B) a dog", "B: ..."
    m = _LETTER_PREFIX.match(text) or _LETTER_PREFIX_LOOSE.match(text)
    if m and m.group(1) in valid:
        return m.group(1)
    # 4. an option's text, when exactly one option's text appears (the longest wins when one contains another)
    said = f" {normalize_text(text)} "
    hits = [(letter, normalize_text(body)) for letter, body in options if normalize_text(body)]
    hits = [(letter, body) for letter, body in hits if f" {body} " in said]
    if hits:
        hits.sort(key=lambda h: len(h[1]), reverse=True)
        best = hits[0]
        if all(body in best[1] for _, body in hits[1:]):
            return best[0]
        return None
    # 5. a lone capital letter standing as a word, when exactly one option letter does ("I think B")
    lone = {c for c in re.findall(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", text) if c in valid and c != "I"}
    if re.search(r"(?<![A-Za-z])A\s+(?!(?:or|and|nor)\b)[a-z]", text):  # "A" as an article: "A cat ..."
        lone.discard("A")
    if len(lone) == 1:
        return lone.pop()
    return None


def _tally() -> dict:
    return {"correct": 0, "total": 0}


def score(records: Iterable[Mapping], by: Sequence[str] = ("duration", "task_type")) -> dict:
    """Accuracy overall and per value of each field in ``by``, over records with ``correct`` (bool).

    Returns {"overall": {correct, total, accuracy}, "<field>": {value: {correct, total, accuracy}}}; accuracy
    is None where total is 0. Records whose ``correct`` is None (errors) are counted apart in "errors".
    """
    out: dict = {"overall": _tally(), "errors": 0}
    for field in by:
        out[field] = {}
    for rec in records:
        if rec.get("correct") is None:
            out["errors"] += 1
            continue
        tallies = [out["overall"]] + [out[f].setdefault(str(rec.get(f)), _tally()) for f in by]
        for t in tallies:
            t["total"] += 1
            t["correct"] += int(bool(rec["correct"]))
    for t in [out["overall"]] + [t for f in by for t in out[f].values()]:
        t["accuracy"] = t["correct"] / t["total"] if t["total"] else None
    return out
