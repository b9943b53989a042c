"""Scoring short answers the way lmms-eval scores short-answer VQA.

lmms-eval's VQAv2 / TextVQA / VizWiz scoring (EvalAI's answer processor) normalises both
the model's answer and the reference before an exact match: punctuation is dropped when
it touches a space (or anywhere, in text with a number like 1,000) and otherwise turns
into a space ("t-shirt" -> "t shirt"); full stops that are not decimal points go;
everything is lower-cased; number words "zero".."ten" (and "none") become digits; the
articles a / an / the go; common contractions get their apostrophe back ("dont" ->
"don't", a subset of EvalAI's list). ``tests/test_lmms_eval.py`` checks
:func:`normalize_answer` against lmms-eval's own processor. VQAv2's 10-annotator
averaging does not apply: a row has one reference answer. Every consumer (``flashvlm
compare``, the lmms-eval task written from a JSONL file) scores through
:func:`score_answer`.
"""

from __future__ import annotations

import re

#: How a row can be scored (the dataset's optional ``scoring`` field).
#: - "vqa": normalised exact match (default);
#: - "exact": the stripped prediction equals the stripped answer, case-sensitive;
#: - "contains": the normalised answer appears as whole words in the normalised prediction.
SCORING_RULES = ("vqa", "exact", "contains")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't "
        "mustn't needn't shan't shouldn't wasn't weren't won't wouldn't he's she's it'll i'm i've "
        "i'd you're you've you'll they're they've they'll we've what's that's there's who's where's"
    ).split()
}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_FULL_STOP = re.compile(r"\.(?!\d)")  # "3." -> "3", "1.5" stays
_COMMA_IN_NUMBER = re.compile(r"(?<=\d)(,)+(?=\d)")


def normalize_answer(text: str) -> str:
    """The lmms-eval / EvalAI normal form of a short answer: ``"The Red."`` -> ``"red"``."""
    text = " ".join(text.split())
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    spaced = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in spaced or f" {mark}" in spaced
        text = text.replace(mark, "" if touches_space or has_number_comma else " ")
    text = _FULL_STOP.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def score_answer(prediction: str, answer: str, scoring: str = "vqa") -> bool:
    """Whether ``prediction`` answers ``answer`` under one of :data:`SCORING_RULES`."""
    if scoring == "exact":
        return prediction.strip() == answer.strip()
    predicted, expected = normalize_answer(prediction), normalize_answer(answer)
    if scoring == "contains":
        return bool(expected) and f" {expected} " in f" {predicted} "
    return predicted == expected
