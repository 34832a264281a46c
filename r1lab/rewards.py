"""Reward functions in TRL's shape: `f(completions, **columns) -> list[float | None]`, one value per completion.

None means "cannot judge" (e.g. a gold answer that does not parse); a trainer skips it rather than scoring it.
Completions are strings or conversations (lists of {"role", "content"} messages, whose contents are joined).
Dataset columns arrive as keyword lists aligned with the completions; columns a reward does not use are ignored.

Registry: `get_reward("accuracy" | "format" | "overlong" | "language" | "code" | "code_fraction" |
"path/to/file.py:function", **params)`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import sys
import traceback
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from r1lab.reasoning import THINK_END, THINK_START, split_reasoning
from r1lab.tasks import Problem, get_task
from r1lab.tasks.answers import extract_answer, grade

__all__ = [
    "RewardFn",
    "completion_text",
    "final_answer",
    "accuracy",
    "format_reward",
    "overlong",
    "language_consistency",
    "code_passed",
    "code_fraction",
    "weighted_sum",
    "get_reward",
    "list_rewards",
]

RewardFn = Callable[..., list]
Completion = str | list[dict] | dict


def completion_text(completion: Completion) -> str:
    """The text of a completion: the string itself, or a conversation's message contents joined (a message's
    `reasoning_content`, as DeepSeek's API returns it, comes back as a `<think>` block before its content)."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else completion
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"a conversational completion is a list of {{'role', 'content'}} dicts (got {m!r:.80})")
        if m.get("reasoning_content"):
            parts.append(f"{THINK_START}{m['reasoning_content']}{THINK_END}")
        parts.append(m.get("content") or "")
    return "".join(parts)


def final_answer(text: str) -> str | None:
    """The answer a completion commits to: extracted from what follows the thinking. A think block that never
    closes has no answer (its text is unfinished reasoning, not a reply)."""
    _, content = split_reasoning(text)
    return extract_answer(content)


def accuracy(
    completions: Sequence[Completion],
    answer: Sequence[str],
    task: Sequence[str] | None = None,
    meta: Sequence[dict | None] | None = None,
    **kw,
) -> list[float | None]:
    """1.0 if the final answer is right, else 0.0 (also when no answer can be extracted); None when the gold
    cannot be judged. With a `task` column, the task's own `check` judges (e.g. any valid countdown expression),
    given the `meta` column when there is one, and a code task's own `extract` takes the program out of the reply;
    without, `answers.grade`."""
    _same_length(completions, answer=answer, task=task, meta=meta)
    rewards: list[float | None] = []
    for i, completion in enumerate(completions):
        text = completion_text(completion)
        if task is None or task[i] is None:
            verdict = grade(final_answer(text), answer[i])
        else:
            row_meta = dict(meta[i] or {}) if meta is not None else {}
            problem = Problem(id="", task=task[i], prompt="", answer=answer[i], meta=row_meta)
            judge = _task(task[i])
            predicted = judge.extract(split_reasoning(text)[1]) if hasattr(judge, "extract") else final_answer(text)
            verdict = judge.check(predicted, problem)
        rewards.append(None if verdict is None else float(verdict))
    return rewards


def code_passed(
    completions: Sequence[Completion],
    task: Sequence[str],
    meta: Sequence[dict | None],
    answer: Sequence[str] | None = None,
    **kw,
) -> list[float | None]:
    """Code tasks: 1.0 when the reply's program passes every hidden test in the sandbox, else 0.0 (also when the
    reply has no code); None when the sandbox could not judge (unavailable, or an infrastructure error)."""
    return [None if r is None else float(r.passed) for r in _sandbox_results(completions, task, meta, answer)]


def code_fraction(
    completions: Sequence[Completion],
    task: Sequence[str],
    meta: Sequence[dict | None],
    answer: Sequence[str] | None = None,
    **kw,
) -> list[float | None]:
    """Code tasks: the fraction of hidden tests the reply's program passes (0.0 without code); None when the sandbox
    could not judge."""
    return [
        None if r is None else (r.tests_passed or 0) / max(1, r.tests_total or 0)
        for r in _sandbox_results(completions, task, meta, answer)
    ]


def _sandbox_results(completions, task, meta, answer) -> list:
    """Every completion's program submitted to the shared sandbox pool at once, then gathered: Results, a passing-
    nothing stand-in for replies without code, None where the sandbox could not judge (warned once, with the fix)."""
    if task is None or meta is None:
        raise ValueError(
            "code rewards need the `task` and `meta` columns (the tests live in meta); the dataset rows "
            "must come from a code task such as humaneval or pyfunc"
        )
    _same_length(completions, task=task, meta=meta, answer=answer)
    from r1lab.sandbox import Result

    pending = []
    for i, completion in enumerate(completions):
        judge = _task(task[i])
        if not hasattr(judge, "submit"):
            raise ValueError(f"code rewards need a code task (humaneval, pyfunc); row {i} is task {task[i]!r}")
        problem = Problem(
            id="", task=task[i], prompt="", answer=answer[i] if answer is not None else "", meta=dict(meta[i] or {})
        )
        code = judge.extract(split_reasoning(completion_text(completion))[1])
        pending.append(
            judge.submit(code, problem)
            if code is not None
            else Result(status="failed", tests_passed=0, tests_total=len(judge.tests(problem)))
        )
    results = [p if isinstance(p, Result) else p.result() for p in pending]
    for r in results:
        if not r.judged:
            warnings.warn(f"code reward cannot judge ({r.status}): {r.detail}", RuntimeWarning, stacklevel=3)
            break
    return [r if r.judged else None for r in results]


def format_reward(completions: Sequence[Completion], **kw) -> list[float | None]:
    """R1-Zero's format reward: 1.0 for `<think>...</think> <answer>...</answer>` with exactly one think block, a
    non-empty answer after it and only whitespace elsewhere, else 0.0. An empty think block is well-formed. A
    missing opening tag is accepted when the closing one is there: the prompt prefilled `<think>`. Linear time; a
    completion over FORMAT_MAX_CHARS characters scores 0.0 unread (no context window holds one)."""
    return [float(_well_formed(completion_text(completion))) for completion in completions]


FORMAT_MAX_CHARS = 1 << 20  # 1 Mi characters, ~250k tokens: longer replies are degenerate, not well-formed
_TAGS = (THINK_START, THINK_END, "<answer>", "</answer>")


def _well_formed(text: str) -> bool:
    """`<think>A</think> <answer>B</answer>`, B not blank, no tag inside A or B: found with str.find (a lazy regex
    backtracks quadratically on replies that repeat the tags)."""
    if len(text) > FORMAT_MAX_CHARS:
        return False
    text = text.strip()
    if not text.startswith(THINK_START):
        text = THINK_START + text  # the prefilled case; a completion with no closing tag still fails below
    end = text.find(THINK_END)
    rest = text[end + len(THINK_END) :].lstrip() if end != -1 else ""
    if not (rest.startswith("<answer>") and rest.endswith("</answer>") and len(rest) >= len("<answer></answer>")):
        return False
    thinking, answer = text[len(THINK_START) : end], rest[len("<answer>") : -len("</answer>")]
    return answer.strip() != "" and not any(t in thinking or t in answer for t in _TAGS)


def overlong(max_len: int = 256, cache_len: int = 64) -> RewardFn:
    """DAPO's soft overlong punishment as a reward: 0 up to max_len - cache_len tokens, then falling linearly to
    -1 at max_len, and -1 beyond. Lengths are taken from the `completion_ids` column (token ids per completion)."""
    if max_len < 1 or not 0 <= cache_len <= max_len:
        raise ValueError(
            f"overlong needs max_len >= 1 and 0 <= cache_len <= max_len (got max_len={max_len}, cache_len={cache_len})"
        )

    def overlong_reward(
        completions: Sequence[Completion], completion_ids: Sequence[Sequence[int]] | None = None, **kw
    ) -> list[float | None]:
        if completion_ids is None:
            raise ValueError(
                "the overlong reward needs the `completion_ids` column (token ids of each completion, "
                "as TRL passes it); pass completion_ids=[[...], ...]"
            )
        _same_length(completions, completion_ids=completion_ids)
        return [overlong_penalty(len(ids), max_len, cache_len) for ids in completion_ids]

    overlong_reward.__name__ = "overlong"
    return overlong_reward


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO eq. 13: R_length(y) for a completion of `length` tokens."""
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / cache_len
    return -1.0


# Letter scripts by Unicode name prefix; a language is judged by script, which needs no language model or
# dictionary. Scripts written without spaces count one word per character.
SCRIPTS = (
    "LATIN",
    "CJK",
    "HIRAGANA",
    "KATAKANA",
    "HANGUL",
    "CYRILLIC",
    "GREEK",
    "ARABIC",
    "HEBREW",
    "DEVANAGARI",
    "THAI",
)
_UNSPACED = {"CJK", "HIRAGANA", "KATAKANA", "THAI"}
LANGUAGE_SCRIPTS = {
    "en": {"LATIN"},
    "fr": {"LATIN"},
    "de": {"LATIN"},
    "es": {"LATIN"},
    "it": {"LATIN"},
    "pt": {"LATIN"},
    "zh": {"CJK"},
    "ja": {"CJK", "HIRAGANA", "KATAKANA"},
    "ko": {"HANGUL", "CJK"},
    "ru": {"CYRILLIC"},
    "uk": {"CYRILLIC"},
    "el": {"GREEK"},
    "ar": {"ARABIC"},
    "he": {"HEBREW"},
    "hi": {"DEVANAGARI"},
    "th": {"THAI"},
}


def language_consistency(
    completions: Sequence[Completion], language: str | Sequence[str] = "en", **kw
) -> list[float | None]:
    """R1's language-consistency reward: the share of the reasoning's words written in the target language's
    script (the whole text when there is no think block). Latin languages are not told apart from each other.
    LaTeX commands and one-letter Latin words (variables) are not words; None when there are no words."""
    out = []
    for i, completion in enumerate(completions):
        lang = language if isinstance(language, str) else language[i]
        if lang not in LANGUAGE_SCRIPTS:
            raise ValueError(
                f"unknown language {lang!r} for language consistency; choose one of {', '.join(LANGUAGE_SCRIPTS)}"
            )
        reasoning, content = split_reasoning(completion_text(completion))
        words = script_words(content if reasoning is None else reasoning)
        out.append(None if not words else sum(s in LANGUAGE_SCRIPTS[lang] for s in words) / len(words))
    return out


def script_words(text: str) -> list[str]:
    """The script of each word in `text`: runs of letters in one script, one per character in unspaced scripts."""
    text = re.sub(r"\\[a-zA-Z]+", " ", text)  # LaTeX commands
    words, run, run_script = [], 0, None
    for ch in text + " ":
        script = _script(ch) if ch.isalpha() else None
        if script in _UNSPACED:
            if run_script is not None:
                words += _close(run_script, run)
            words.append(script)
            run, run_script = 0, None
        elif script is not None and script == run_script:
            run += 1
        else:
            if run_script is not None:
                words += _close(run_script, run)
            run, run_script = (1, script) if script is not None else (0, None)
    return words


def _close(script: str, length: int) -> list[str]:
    return [] if script == "LATIN" and length == 1 else [script]


@lru_cache(maxsize=4096)
def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for s in SCRIPTS:
        if name.startswith(s):
            return s
    return "OTHER"


def weighted_sum(funcs: Sequence[RewardFn], weights: Sequence[float] | None = None) -> RewardFn:
    """One reward: sum of w_i * f_i. A None term is skipped (adds 0, as TRL's NaN-skipping sum does); the result is
    None only when every term is None, so the trainer can drop a sample nothing could judge."""
    funcs = list(funcs)
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if not funcs:
        raise ValueError("weighted_sum needs at least one reward function")
    if len(weights) != len(funcs):
        raise ValueError(f"weighted_sum got {len(funcs)} functions but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"reward weights must be finite (got {weights})")

    def combined(completions, **columns) -> list[float | None]:
        columns_out = [f(completions, **columns) for f in funcs]
        for f, values in zip(funcs, columns_out):
            if len(values) != len(completions):
                raise ValueError(f"reward {_name(f)} returned {len(values)} values for {len(completions)} completions")
        total = []
        for row in zip(*columns_out):
            terms = [w * v for w, v in zip(weights, row) if v is not None]
            total.append(sum(terms) if terms else None)
        return total

    combined.__name__ = "+".join(f"{w:g}*{_name(f)}" for w, f in zip(weights, funcs))
    return combined


_BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": lambda: accuracy,
    "format": lambda: format_reward,
    "overlong": overlong,
    "language": lambda language="en": _language_reward(language),
    "code": lambda: code_passed,
    "code_fraction": lambda: code_fraction,
}


def _language_reward(language: str) -> RewardFn:
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGE_SCRIPTS)}")

    def language_reward(completions, **columns):
        columns.setdefault("language", language)
        return language_consistency(completions, **columns)

    language_reward.__name__ = "language"
    return language_reward


def list_rewards() -> list[str]:
    return sorted(_BUILTINS)


def get_reward(spec: str | RewardFn, **params) -> RewardFn:
    """A reward by name ("accuracy", "format", "overlong", "language", "code", "code_fraction"), or a user's function
    as `path/to/file.py:function`. `params` go to factories (`get_reward("overlong", max_len=512, cache_len=128)`)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"a reward spec is a name or 'path/to/file.py:function' (got {spec!r})")
    if spec in _BUILTINS:
        try:
            return _BUILTINS[spec](**params)
        except TypeError as e:
            raise TypeError(f"reward {spec!r} does not take {sorted(params)}: {e}") from e
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}; choose one of {', '.join(list_rewards())}, "
            f"or give a file as 'path/to/file.py:function'"
        )
    if params:
        raise TypeError(f"parameters {sorted(params)} cannot be passed to a reward from a file ({spec!r})")
    return _load_user_reward(spec)


def _load_user_reward(spec: str) -> RewardFn:
    path_str, _, func_name = spec.rpartition(":")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"reward file {path_str!r} not found (looked at {path.resolve()}); "
            f"give the path to a .py file, relative to {Path.cwd()} or absolute"
        )
    if not func_name.isidentifier():
        raise ValueError(f"{func_name!r} in reward spec {spec!r} is not a Python function name")
    module_name = f"r1lab_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {path} as Python; a reward file must be a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file, not r1lab: named in one line, the cause kept on the exception
        del sys.modules[module_name]
        raise RewardError(
            f"reward file {path} failed to import: {type(e).__name__}: {e}{_where(e, path)}; fix the file"
        ) from e
    if not hasattr(module, func_name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"{path} has no function {func_name!r}; it defines {', '.join(found) or 'no functions'}")
    func = getattr(module, func_name)
    if not callable(func):
        raise RewardError(
            f"{path}:{func_name} is a {type(func).__name__}, not a function; a reward is "
            f"f(completions, **columns) -> list[float | None]"
        )
    return _checked(func, spec, path)


class RewardError(ValueError):
    """A user's reward that cannot be loaded, raised, or returned values no trainer can use; the message names it."""


def _checked(func: RewardFn, spec: str, path: Path) -> RewardFn:
    """A user's reward as trainers call it: an exception inside it, or a value that is not one finite number (or
    None) per completion, is a RewardError naming the reward and the line, not a traceback from the trainer."""

    @functools.wraps(func)
    def reward(completions, **columns):
        try:
            values = func(completions, **columns)
        except Exception as e:  # noqa: BLE001 - the user's code
            raise RewardError(
                f"reward {spec!r} raised {type(e).__name__}: {e}{_where(e, path)}; fix the "
                "function (return None for a completion it cannot judge)"
            ) from e
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise RewardError(
                f"reward {spec!r} returned {_shown(values)}, not a list; a reward returns one number "
                "(or None) per completion"
            )
        if len(values) != len(completions):
            raise RewardError(
                f"reward {spec!r} returned {len(values)} values for {len(completions)} completions; "
                "return one number (or None) per completion"
            )
        for i, v in enumerate(values):
            try:
                ok = v is None or (not isinstance(v, (str, bytes)) and math.isfinite(float(v)))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RewardError(
                    f"reward {spec!r} returned {_shown(v)} for completion {i}; each value must be a "
                    "finite number, or None where the reward cannot judge"
                )
        return values

    return reward


def _where(e: BaseException, path: Path) -> str:
    """' (path line N)': the last line of the user's file that the exception passed through, if any."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" ({path} line {lines[-1]})" if lines else ""


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


@lru_cache(maxsize=64)
def _task(name: str):
    return get_task(name)


def _name(f) -> str:
    return getattr(f, "__name__", type(f).__name__)


def _same_length(completions, **columns) -> None:
    for name, values in columns.items():
        if values is not None and len(values) != len(completions):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(completions)} completions")
