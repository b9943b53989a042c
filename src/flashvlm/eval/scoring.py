"""Scoring short answers the way lmms-eval scores short-answer VQA.

lmms-eval (and the VQAv2 / EvalAI evaluation it inherits) normalises both the model's
answer and the reference before an exact match: lower-case; drop commas, question marks
and the space before "'s"; strip or space out punctuation; drop full stops that are not
decimal points; number words "zero".."ten" (and "none") to digits; drop the articles
a / an / the; restore the apostrophe of common contractions ("dont" -> "don't"). The
normaliser below follows those steps (written from the description, with the common
contractions rather than EvalAI's full list). VQAv2's 10-annotator averaging does not
apply: a row has one reference answer.
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
_PUNCTUATION = ";/[]\"{}()=+\\_->,<@`?!"
# EvalAI's pattern reads as "a full stop not followed by a digit" ("3." -> "3", "1.5" stays).
_FULL_STOP = re.compile(r"\.(?!\d)")


def normalize_answer(text: str) -> str:
    """The lmms-eval / EvalAI normal form of a short answer."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = " ".join(text.split())
    # A mark next to a space (in the text as it came) is dropped; inside a word it separates
    # ("t-shirt" -> "t shirt"). EvalAI's extra rule for commas inside numbers never fires,
    # as commas are already gone.
    spaced = text
    for mark in _PUNCTUATION:
        text = text.replace(mark, "" if f"{mark} " in spaced or f" {mark}" in spaced else " ")
    text = _FULL_STOP.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def score_answer(prediction: str, answer: str, scoring: str = "vqa") -> bool:
    """Whether ``prediction`` answers ``answer`` under one of :data:`SCORING_RULES`."""
    if scoring == "exact":
        return prediction.strip() == answer.strip()
    predicted, expected = normalize_answer(prediction), normalize_answer(answer)
    if scoring == "contains":
        return bool(expected) and f" {expected} " in f" {predicted} "
    return predicted == expected
