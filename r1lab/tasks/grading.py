"""Math equivalence judged by math-verify in worker processes, each request under a deadline and a memory cap.

math-verify (sympy under it) can run for minutes or take gigabytes on a hostile answer (`\\int_0^1 e^{x^7}\\sin(x^{13})
dx` ran past 30 s, `((2^{1000})^{1000})^{1000}` reached 793 MB), and its own timeouts use SIGALRM, which works only
in the main thread and cannot stop one long call into C (a big-integer power). So parsing and comparing run in small
persistent workers started from a clean interpreter (no torch): a request that passes DEADLINE_S gets its worker
killed (the next request starts a fresh one), a worker's address space is capped at MEMORY_MB, and any thread may
ask, up to MAX_WORKERS at once. A hostile predicted answer is then "not a match", never a hang; a gold that cannot
be judged in time is None.

Parses are strict: only a parse of the whole answer counts. math-verify otherwise falls back to a number it finds
inside LaTeX it could not read (`2 \\to 5` read as 5), or to the last part of an equation chain it could not read.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

__all__ = ["gold_is_judgeable", "math_equal", "shutdown", "DEADLINE_S", "MEMORY_MB", "MAX_WORKERS"]

DEADLINE_S = 5.0  # wall seconds one request may take before its worker is killed (a parse takes ~4 ms)
MEMORY_MB = 512  # address-space cap of a worker (RLIMIT_AS); one peaks at ~82 MB grading 1,500 MATH-500 pairs
MAX_WORKERS = min(4, os.cpu_count() or 1)  # workers started on demand when threads ask at once
STARTUP_S = 60.0  # how long a new worker may take to import math-verify and say it is ready
# math-verify's own timeouts inside a worker (its main thread, where SIGALRM works): they end most slow parses and
# comparisons without killing the worker, which DEADLINE_S then does only for work stuck in C. Whole seconds.
PARSE_TIMEOUT_S = 2
VERIFY_TIMEOUT_S = 2

# Longest answer string handed to math-verify: its LaTeX parser is super-linear on long junk (5,000 chars
# take seconds), and no real final answer is that long (the longest MATH-500 gold has 53 characters).
MAX_ANSWER_CHARS = 300
# Cheap checks that spare a worker (and its restart) the shapes known to make sympy run away: unbraced exponent
# chains (a^a^...: depth 20 takes 30 s), deep bracket nesting ({ x 12 takes 3 s), unbalanced brackets; and, on the
# parsed expression, numeric exponent towers and exponents or factorials above MAX_EXPONENT.
MAX_NESTING = 8
MAX_EXPONENT = 1000
_UNBRACED_TOWER = re.compile(r"(?:\^\s*[\w.\\]+\s*){5,}")
_ROOT = str(Path(__file__).resolve().parents[2])


def gold_is_judgeable(gold: str) -> bool:
    """Does math-verify parse the whole of `gold`, within the deadline?"""
    return not _too_costly(gold) and _gold_verdict(gold)


def math_equal(predicted: str, gold: str) -> bool | None:
    """Is `predicted` mathematically equal to `gold`? None when the gold cannot be judged; False when the prediction
    does not parse whole, is too costly to parse, or runs past the deadline or the memory cap."""
    if not gold_is_judgeable(gold):
        return None
    return not _too_costly(predicted) and _pair_verdict(predicted, gold)


# Verdicts are cached (evaluation grades k samples against one gold, so pairs repeat), only for strings that pass
# `_too_costly`: at most MAX_ANSWER_CHARS each, so the caches stay within a few MB.
@lru_cache(maxsize=4096)
def _gold_verdict(gold: str) -> bool:
    reply = _pool().ask({"gold": gold, "pred": None})
    return bool(reply and reply["gold"])


@lru_cache(maxsize=16384)
def _pair_verdict(predicted: str, gold: str) -> bool:
    reply = _pool().ask({"gold": gold, "pred": predicted})
    return bool(reply and reply["equal"])


def _too_costly(s: str) -> bool:
    """A string math-verify would spend super-linear time on: too long, an unbraced exponent chain, nesting deeper
    than MAX_NESTING, or unbalanced brackets."""
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


def shutdown() -> None:
    """Stop the workers (at exit; a later request starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


# --- the parent's side: a pool of workers -------------------------------------------------------------------


class _Worker:
    """One grading process: a JSON request per line on its stdin, a JSON reply per line on its stdout."""

    def __init__(self):
        boot = f"import sys; sys.path.insert(0, {_ROOT!r}); from r1lab.tasks.grading import _serve; _serve()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        ready = self._read(STARTUP_S)
        if not ready or "error" in ready:
            exited = self.proc.poll()
            self.kill()
            why = (
                ready["error"]
                if ready
                else f"it exited with code {exited}"
                if exited is not None
                else f"no reply within {STARTUP_S:g} s"
            )
            raise RuntimeError(
                f"the math grading worker did not start ({why}); check that math-verify imports: "
                f"{sys.executable} -c 'import math_verify'"
            )

    def ask(self, request: dict) -> dict | None:
        """The reply, or None when the worker ran past DEADLINE_S or died (the caller kills it). Raises
        BrokenPipeError when the worker was already gone before the request."""
        data = json.dumps(request).encode() + b"\n"
        while data:
            data = data[os.write(self.proc.stdin.fileno(), data) :]
        return self._read(DEADLINE_S)

    def _read(self, timeout: float) -> dict | None:
        fd, buf = self.proc.stdout.fileno(), b""
        poller = select.poll()  # not select(): it fails on descriptors above 1023, which a busy server has
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # it died: the memory cap, a crash, or a kill
            buf += chunk
        return json.loads(buf)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def close(self, wait_s: float = 1.0) -> None:
        """Ask it to leave (end of input), and kill it if it has not within `wait_s`."""
        self.proc.stdin.close()
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


class _Pool:
    """Workers started on demand, up to `size`; a thread holds one for the length of one request."""

    def __init__(self, size: int):
        self.size = size
        self.idle: list = []
        self.busy: set = set()
        self.cond = threading.Condition()

    def ask(self, request: dict) -> dict | None:
        for _ in range(2):  # once more with a fresh worker if the first was gone before it was asked
            worker, reply, gone = self._take(), None, False
            try:
                reply = worker.ask(request)
            except BrokenPipeError:
                gone = True
            finally:
                self._give(worker, keep=reply is not None)
            if not gone:
                return reply
        return None

    def _take(self) -> _Worker:
        with self.cond:
            while not self.idle and len(self.busy) >= self.size:
                self.cond.wait()
            if self.idle:
                worker = self.idle.pop()
                self.busy.add(worker)
                return worker
            placeholder = object()
            self.busy.add(placeholder)  # counts toward size while it starts
        try:
            worker = _Worker()
        except BaseException:
            with self.cond:
                self.busy.discard(placeholder)
                self.cond.notify()
            raise
        with self.cond:
            self.busy.discard(placeholder)
            self.busy.add(worker)
        return worker

    def _give(self, worker: _Worker, keep: bool) -> None:
        if not keep:
            worker.kill()
        with self.cond:
            self.busy.discard(worker)
            if keep:
                self.idle.append(worker)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            idle, busy, self.idle = self.idle, [w for w in self.busy if isinstance(w, _Worker)], []
        for worker in idle:
            worker.close()
        for worker in busy:  # a thread still waits on it: its request ends as an overrun
            worker.proc.kill()

    def forget(self) -> None:
        """In a forked child: drop the parent's workers without stopping them (they are the parent's)."""
        for worker in self.idle:
            worker._close_pipes()
        self.idle, self.busy = [], set()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Pool(MAX_WORKERS)
        return _POOL


def _after_fork_in_child() -> None:
    global _POOL, _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    if _POOL is not None:
        _POOL.forget()
        _POOL = None


atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)


# --- the worker's side --------------------------------------------------------------------------------------


def _serve() -> None:
    """A worker's life: cap its memory, import math-verify, then answer one request per line until stdin closes."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = MEMORY_MB << 20 if hard == resource.RLIM_INFINITY else min(MEMORY_MB << 20, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):  # macOS refuses address-space limits; the deadline still holds
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; the worker leaves when its input ends
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj).encode() + b"\n")
        replies.flush()

    try:
        _strict_math_verify()
    except Exception as e:
        reply({"error": f"{type(e).__name__}: {e}"})
        return
    reply({"ready": True})
    for line in sys.stdin.buffer:
        _limit_cpu()
        request = json.loads(line)
        gold = _parse(request["gold"])
        if not gold or request["pred"] is None:
            reply({"gold": bool(gold), "equal": None})
            continue
        pred = _parse(request["pred"])
        reply({"gold": True, "equal": bool(pred) and _verify(gold, pred)})


def _limit_cpu() -> None:
    """A second bound that holds if the parent dies mid-request (then no one kills the worker): the kernel ends a
    worker that spends more than about DEADLINE_S + 2 CPU seconds on one request (RLIMIT_CPU, whole seconds)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime) + int(DEADLINE_S) + 2
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _strict_math_verify() -> None:
    """Import math-verify, and turn off its fallback to the last part of an `a = b = c` chain whose whole does not
    parse (`a = \\foo = 5` would read as 5): in this process only."""
    import math_verify.parser

    if hasattr(math_verify.parser, "get_last_eq"):
        math_verify.parser.get_last_eq = lambda latex: latex


@lru_cache(maxsize=2048)  # small beside MEMORY_MB: a worker lives as long as its parent
def _parse(s: str) -> tuple:
    """math-verify's parse of the whole of one bare answer (wrapped in `\\boxed{}` so LaTeX like `3\\sqrt{13}` is read
    whole, not as its first number), or () when it does not parse as a whole or is not `_is_safe` to compare."""
    from math_verify import LatexExtractionConfig, parse

    try:
        parsed = parse(
            "\\boxed{" + s + "}",
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
            extraction_mode="first_match",
            fallback_mode="no_fallback",
            parsing_timeout=PARSE_TIMEOUT_S,
        )
    except Exception:  # MemoryError at the cap included
        return ()
    objects = tuple(x for x in parsed if not isinstance(x, str))
    return objects if objects and all(_is_safe(x) for x in objects) else ()


def _verify(gold: tuple, pred: tuple) -> bool:
    from math_verify import verify

    try:
        return bool(verify(list(gold), list(pred), timeout_seconds=VERIFY_TIMEOUT_S))
    except Exception:  # its timeout, sympy errors on odd input, MemoryError at the cap: not a match
        return False


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
