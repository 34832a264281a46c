"""Final-answer extraction (`<answer>` tags, `\\boxed{}`, GSM8K `####`) and grading against a gold answer.

`grade` returns True/False when it can judge and None when it cannot (the gold answer does not parse and the
strings differ), so callers skip and count such cases instead of scoring them as a free 0 or 1.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache

__all__ = ["extract_answer", "extract_boxed", "grade", "normalize_answer", "parse_number"]

# Longest answer string handed to math-verify: its LaTeX parser is super-linear on long junk (5,000 chars
# take seconds), and no real final answer is that long (the longest MATH-500 gold has 53 characters).
MAX_ANSWER_CHARS = 300
# Shapes that cost math-verify's parser super-linear time, so are never handed to it: unbraced exponent chains
# (a^a^...: depth 20 takes 30 s), deep bracket nesting ({ x 12 takes 3 s), unbalanced brackets.
_UNBRACED_TOWER = re.compile(r"(?:\^\s*[\w.\\]+\s*){5,}")
MAX_NESTING = 8
# math-verify's own timeouts use SIGALRM, which only works in the main thread; elsewhere they are off and
# `_is_safe` (no exponent towers, no huge exponents or factorials) is what keeps sympy from running away.
TIMEOUT_S = 5
MAX_EXPONENT = 1000

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed +([^\s$]+)")  # `\boxed 5`, which LaTeX accepts for a single token
_HASHES = re.compile(r"####\s*(.+)")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")


def extract_answer(text: str | None) -> str | None:
    """The final answer in a completion: the last `<answer>...</answer>` (its `\\boxed{}` content if it has
    one), else the last `\\boxed{...}`/`\\fbox{...}`, else GSM8K's `#### X`; None when there is none or it is blank."""
    if not text:
        return None
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        inner = tagged[-1]
        boxed = extract_boxed(inner)
        return _blank_to_none(boxed if boxed is not None else inner)
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
    """Content of the last `\\boxed{...}` or `\\fbox{...}` with balanced (nested) braces; None if none closes."""
    found = None
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # an escaped brace, as in \{1, 2\}, does not nest
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            found = (m.start(), text[m.end():i - 1])
    bare = [(m.start(), m.group(1)) for m in _BOX_BARE.finditer(text)]
    candidates = [c for c in (found, bare[-1] if bare else None) if c is not None]
    return max(candidates)[1].strip() if candidates else None


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
    """Is `predicted` the same answer as `gold`? Exact and plain-number matches first, then math-verify decides
    equivalence (`\\frac12` == `0.5`). None when the gold is blank, or does not parse and the strings differ."""
    if gold is None or not normalize_answer(gold):
        return None
    gold_number = parse_number(gold)
    if predicted is None or not normalize_answer(predicted):
        return False if gold_number is not None or _parse_math(gold) else None
    if normalize_answer(predicted) == normalize_answer(gold):
        return True
    number = parse_number(predicted)
    if gold_number is not None and number is not None:
        return gold_number == number
    gold_math = _parse_math(gold)
    if not gold_math:
        return None
    pred_math = _parse_math(predicted)
    if not pred_math:
        return False
    try:
        from math_verify import verify

        return bool(verify(list(gold_math), list(pred_math), timeout_seconds=_timeout()))
    except Exception:  # math-verify's own timeout, sympy errors on odd input: not a match
        return False


@lru_cache(maxsize=8192)
def _parse_math(s: str) -> tuple:
    """math-verify's parse of one bare answer (wrapped in `\\boxed{}` so LaTeX like `3\\sqrt{13}` is read whole,
    not as its first number); only sympy results, and only those `_is_safe` to compare; () when none. Cached:
    evaluation grades k samples against one gold."""
    if _too_costly(s):
        return ()
    try:
        from math_verify import parse

        parsed = parse("\\boxed{" + s + "}", parsing_timeout=_timeout())
    except Exception:
        return ()
    objects = tuple(x for x in parsed if not isinstance(x, str))
    return objects if objects and all(_is_safe(x) for x in objects) else ()


def _too_costly(s: str) -> bool:
    if len(s) > MAX_ANSWER_CHARS or _UNBRACED_TOWER.search(s):
        return True
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return depth != 0 or deepest > MAX_NESTING


def _is_safe(expr) -> bool:
    """No numeric exponent towers, numeric exponents or factorials above MAX_EXPONENT: sympy evaluates those as big
    integers in C, where no timeout can interrupt it (verify(5, 9^{9^{9^9}}) runs for minutes)."""
    import sympy

    try:
        nodes = list(sympy.preorder_traversal(expr))
    except Exception:
        return False
    for node in nodes:
        if isinstance(node, sympy.Pow):
            exp = node.exp
            if exp.free_symbols:
                continue  # symbolic exponents are never expanded into integers
            if exp.has(sympy.Pow) or exp.has(sympy.factorial):
                return False
            if any(abs(a) > MAX_EXPONENT for a in exp.atoms(sympy.Number)):
                return False
        elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma)):
            if any(abs(a) > MAX_EXPONENT for a in node.atoms(sympy.Number)):
                return False
    return True


def _timeout() -> int | None:
    """math-verify's SIGALRM timeout in the main thread; None (its off switch) in server and worker threads."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _blank_to_none(s: str) -> str | None:
    s = s.strip()
    return s or None

