"""Final-answer extraction (`<answer>` tags, `\\boxed{}`, GSM8K `####`) and grading against a gold answer.

Extraction reads only the last SCAN_CHARS characters of a reply (the final answer is at its end) and runs in time
linear in them, so degenerate RL replies (thousands of unclosed `\\boxed{` or `<answer>`) cost what a normal one does.
`grade` returns True/False when it can judge and None when it cannot (the gold answer does not parse and the
strings differ), so callers skip and count such cases instead of scoring them as a free 0 or 1.
"""

from __future__ import annotations

import re
from fractions import Fraction

from r1lab.tasks.grading import gold_is_judgeable, math_equal

__all__ = ["extract_answer", "extract_boxed", "grade", "normalize_answer", "parse_number", "SCAN_CHARS"]

# How much of a reply's end extraction reads: 64 Ki characters, about 16k tokens, far more than any final answer
# with the reasoning before it; an answer that starts earlier than that is not found.
SCAN_CHARS = 65536

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BRACES = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")  # box openings, escaped braces, braces
_BOX_BARE = re.compile(r"\\boxed +([^\s$]+)")  # `\boxed 5`, which LaTeX accepts for a single token
_HASHES = re.compile(r"####\s*(.+)")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")


def extract_answer(text: str | None) -> str | None:
    """The final answer in a completion's last SCAN_CHARS characters: the last `<answer>...</answer>` (its `\\boxed{}`
    content if it has one), else the last `\\boxed{...}`/`\\fbox{...}`, else GSM8K's `#### X`; None when there is
    none or it is blank."""
    if not text:
        return None
    text = text[-SCAN_CHARS:]
    tagged = _last_tagged(text)
    if tagged is not None:
        boxed = extract_boxed(tagged)
        return _blank_to_none(boxed if boxed is not None else tagged)
    boxed = extract_boxed(text)
    if boxed is not None:
        return _blank_to_none(boxed)
    hashes = _HASHES.findall(text)
    if hashes:
        value = hashes[-1].strip().rstrip(".").strip()
        value = value.replace("$", "").strip()
        if _THOUSANDS.match(value):
            value = value.replace(",", "")
        return _blank_to_none(value)
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (in the last SCAN_CHARS characters) with balanced
    (nested) braces; None if none closes. One pass: a stack of open braces, each box's closing found as it pops."""
    text = text[-SCAN_CHARS:]
    found = None
    stack: list[tuple[int, int] | None] = []  # (start, content start) of each open box, None for a plain brace
    for m in _BRACES.finditer(text):
        token = m.group()
        if token == "{":
            stack.append(None)
        elif token == "}":
            box = stack.pop() if stack else None
            if box is not None and (found is None or box[0] > found[0]):
                found = (box[0], text[box[1] : m.start()])
        elif len(token) > 2:  # \boxed{ or \fbox{
            stack.append((m.start(), m.end()))
        # else an escaped brace, as in \{1, 2\}: it does not nest
    bare = [(m.start(), m.group(1)) for m in _BOX_BARE.finditer(text)]
    candidates = [c for c in (found, bare[-1] if bare else None) if c is not None]
    return max(candidates)[1].strip() if candidates else None


def _last_tagged(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` pair, as a left-to-right scan pairs them (each opening with
    the first closing after it); str.find keeps this linear where a lazy regex with no closing tag is quadratic."""
    found, pos = None, 0
    while (i := text.find(_ANSWER_OPEN, pos)) != -1:
        j = text.find(_ANSWER_CLOSE, i + len(_ANSWER_OPEN))
        if j == -1:
            break
        found, pos = text[i + len(_ANSWER_OPEN) : j], j + len(_ANSWER_CLOSE)
    return found


def normalize_answer(s: str) -> str:
    """A canonical string for exact matching: no spaces, `$`, `\\left`/`\\right`, `\\text{}` wrappers, spacing
    commands, trailing period, thousands separators or leading `x =`; `\\dfrac` -> `\\frac`."""
    s = s.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|displaystyle|!|,|;|:|quad|qquad)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s.lower()


def parse_number(s: str | None) -> Fraction | None:
    """An exact number from a plain numeric string (`85`, `-3`, `1,234`, `2.50`, `3/4`, `x = 5`); else None."""
    if s is None or re.search(r"\d\s+\d", s):  # "12 34" is two numbers, not 1234
        return None
    t = normalize_answer(s)
    try:
        if _NUMBER.match(t):
            return Fraction(t)
        num, sep, den = t.partition("/")
        if sep and _NUMBER.match(num) and re.fullmatch(r"\d+", den) and int(den) != 0:
            return Fraction(num) / int(den)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def grade(predicted: str | None, gold: str | None) -> bool | None:
    """Is `predicted` the same answer as `gold`? Exact and plain-number matches here, then math-verify decides
    equivalence (`\\frac12` == `0.5`) in a worker process under a deadline (`grading.math_equal`): a prediction
    math-verify cannot read whole, or that runs past the deadline, is not a match. None when the gold is blank, or
    does not parse and the strings differ."""
    if gold is None or not normalize_answer(gold):
        return None
    gold_number = parse_number(gold)
    if predicted is None or not normalize_answer(predicted):
        return False if gold_number is not None or gold_is_judgeable(gold) else None
    if normalize_answer(predicted) == normalize_answer(gold):
        return True
    number = parse_number(predicted)
    if gold_number is not None and number is not None:
        return gold_number == number
    return math_equal(predicted, gold)


def _blank_to_none(s: str) -> str | None:
    s = s.strip()
    return s or None
