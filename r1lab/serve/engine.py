"""The batching engine behind the server: one thread owns the model and a running `Batch`; requests join it
between decode steps and leave it when they finish or their client goes away (continuous batching).

Each loop iteration drops cancelled rows, admits waiting jobs (one prefill for all of them, merged into the running
batch), decodes one token for every running row, and hands each job its new text through the job's `emit`
callback. Text is detokenized incrementally and held back while it may be the start of a stop string, so what a
streaming client has seen is always a prefix of the final text. With a tool (r1lab.tools), a row that calls it waits
outside the batch for its program in the sandbox's worker pool and re-enters as soon as the program ends; the call
and its output stream as part of the thinking.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from r1lab.sampler import Row, Sampler, SamplingParams

log = logging.getLogger("r1lab.serve")


@dataclass
class Event:
    """New output of one choice of a job. `finish_reason` is set on the choice's last event."""

    choice: int  # index among the request's choices (job.choice_offset + sample index)
    text: str  # text since the previous event of this choice
    tokens: int  # tokens generated so far by this choice
    finish_reason: str | None = None  # "stop" | "length" | "tool_limit" | "error"
    token_ids: list[int] | None = None  # on finish: every generated id (stop token included)
    full_text: str | None = None  # on finish: the whole completion text
    error: str | None = None


@dataclass
class Job:
    """One prompt to complete `params.n` times; `emit` receives lists of Events, called from the engine thread."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[list[Event]], None]
    generator: torch.Generator | None = None
    choice_offset: int = 0
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class EngineStats:
    """Counters the tests and the benchmark read: evidence that requests shared steps, and that cancels happened."""

    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    max_rows_in_step: int = 0
    max_jobs_in_step: int = 0
    finished_rows: int = 0
    cancelled_rows: int = 0
    failed_jobs: int = 0


class TextTracker:
    """Incremental detokenization of one row: new text per token, minus any tail that may begin a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.prefix = self.read = 0  # token offsets: context for the decoder / tokens already turned into text
        self.sent = ""
        self.pending = ""

    def push(self, ids: list[int]) -> str:
        before = self.decode(ids[self.prefix : self.read])
        now = self.decode(ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not in the middle of a multi-byte character
            self.pending += now[len(before) :]
            self.prefix, self.read = self.read, len(ids)
        hold = _stop_prefix_suffix(self.pending, self.stop)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        self.sent += out
        return out

    def finish(self, final_text: str) -> str:
        if final_text.startswith(self.sent):
            return final_text[len(self.sent) :]
        log.warning("streamed text diverged from the final text; the stream keeps what it sent")
        return ""


def _stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class _Active:
    job: Job
    trackers: list[TextTracker]
    left: int  # choices not finished yet


class Engine:
    """Owns the sampler's model on one thread and runs every submitted job in one shared, continuously refilled
    batch of at most `max_batch` rows. `submit`, `cancel` and `close` are safe to call from any thread."""

    def __init__(self, sampler: Sampler, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.sampler, self.max_batch = sampler, max_batch
        self.context = sampler.backend.max_len
        cfg = sampler.model.config
        self.vocab_size = int((cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).vocab_size)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancels: set[int] = set()
        self._active: dict[int, _Active] = {}
        self._running_rows = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> Engine:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="r1lab-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        """Queue a job; ValueError (on the caller's thread) if it could fail inside the running batch, where it would
        fail every other job too."""
        p = job.params.validate()
        if p.n > self.max_batch:
            raise ValueError(f"n={p.n} is more than the {self.max_batch} rows this server runs at once")
        if not p.top_k < 1 << 63:
            raise ValueError(f"top_k must fit in 64 bits (got {p.top_k}); 0 keeps every token")
        if not job.prompt_ids or not all(type(t) is int and 0 <= t < self.vocab_size for t in job.prompt_ids):
            raise ValueError(f"the prompt must be token ids in [0, {self.vocab_size}) (got {len(job.prompt_ids)} ids)")
        with self._cond:
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: int) -> None:
        """Stop a job (its client went away). Unknown or finished jobs are ignored."""
        with self._cond:
            self._cancels.add(job_id)
            self._cond.notify_all()

    def load(self) -> dict:
        with self._cond:
            return {"running_rows": self._running_rows, "waiting_jobs": len(self._waiting)}

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        self.sampler.model.eval()
        with torch.inference_mode():
            batch = self.sampler.new_batch(on_program_done=self._wake)
            while True:
                with self._cond:
                    while (
                        not self._stop
                        and not self._waiting
                        and not self._cancels
                        and not len(batch)
                        and not batch.due(ordered=False)
                    ):
                        self._cond.wait(1.0)
                    if self._stop:
                        break
                    cancels, self._cancels = self._cancels, set()
                    if cancels:
                        self._waiting = deque(j for j in self._waiting if j.id not in cancels)
                    admit = self._take_admissible(batch.busy)
                try:
                    self._drop(batch, cancels)
                    if admit:
                        self._admit(batch, admit)
                    back = batch.due(ordered=False)
                    if back:  # rows whose programs ended: their output, then their next token
                        finished = batch.resume(back)
                        self._publish([p.row for p in back], finished)
                    if len(batch):
                        self._note_step(batch)
                        running = list(batch.rows)
                        finished = batch.step()
                        self._publish(running, finished)
                except Exception as e:  # a bug or an out-of-memory: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                    batch = self.sampler.new_batch(on_program_done=self._wake)
                with self._cond:
                    self._running_rows = batch.busy
            with self._cond:
                left, self._waiting = [a.job for a in self._active.values()] + list(self._waiting), deque()
            for job in left:
                self._fail(job, "the server is shutting down")

    def _wake(self) -> None:
        """A program ended (called from a sandbox thread): let the engine thread look."""
        with self._cond:
            self._cond.notify_all()

    def _take_admissible(self, rows: int) -> list[Job]:
        take = []
        while self._waiting and rows + self._waiting[0].params.n <= self.max_batch:
            job = self._waiting.popleft()
            rows += job.params.n
            take.append(job)
        return take

    def _admit(self, batch, jobs: list[Job]) -> None:
        """Prefill `jobs` into the batch and publish their first tokens (time to first token is one prefill)."""
        rows, state = batch.rows, batch.state
        try:
            finished = self._add(batch, jobs)
        except ValueError:  # one prompt does not fit: admit the others one by one, fail only that one
            finished = []
            for job in jobs:
                try:
                    finished += self._add(batch, [job])
                except ValueError as e:
                    self._fail(job, str(e))
        except Exception as e:  # these jobs are in no list any more: tell their clients
            for job in jobs:
                self._fail(job, f"generation failed: {type(e).__name__}: {e}")
            if batch.rows is rows and batch.state is state:  # their own prefill failed (out of memory, say)
                log.warning(
                    "prefill of %d job(s) failed (%s: %s); the running rows go on", len(jobs), type(e).__name__, e
                )
                return
            raise  # the running batch may be half-changed: it resets
        self.stats.prefills += 1
        admitted = {job.id for job in jobs}
        self._publish([r for r in batch.rows if _job_of(r.key)[0] in admitted], finished)

    def _add(self, batch, jobs: list[Job]) -> list[Row]:
        """Join `jobs` to the batch; returns the rows that finished at their first token."""
        for job in jobs:
            decode, stop = self.sampler.decode, job.params.stop
            self._active[job.id] = _Active(job, [TextTracker(decode, stop) for _ in range(job.params.n)], job.params.n)
        try:
            return batch.add(
                [j.prompt_ids for j in jobs],
                [j.params for j in jobs],
                [j.id for j in jobs],
                [j.generator for j in jobs],
            )
        except Exception:
            for job in jobs:
                self._active.pop(job.id, None)
            raise

    def _drop(self, batch, job_ids: set[int]) -> None:
        if not job_ids:
            return
        keys = {r.key for r in batch.rows + [p.row for p in batch.paused] if _job_of(r.key)[0] in job_ids}
        if keys:
            batch.cancel(keys)
            self.stats.cancelled_rows += len(keys)
        for jid in job_ids:
            self._active.pop(jid, None)

    def _note_step(self, batch) -> None:
        s = self.stats
        s.steps += 1
        s.tokens += len(batch)
        s.max_rows_in_step = max(s.max_rows_in_step, len(batch))
        s.max_jobs_in_step = max(s.max_jobs_in_step, len({_job_of(r.key)[0] for r in batch.rows}))

    def _publish(self, running: list[Row], finished: list[Row]) -> None:
        out: dict[int, tuple[Job, list[Event]]] = {}
        for row in running:
            if row.finish_reason is not None:
                continue  # finished at this step: published below with its final text
            jid, j = _job_of(row.key)
            a = self._active.get(jid)
            if a is None:
                continue
            text = a.trackers[j].push(row.token_ids)
            if text:
                out.setdefault(jid, (a.job, []))[1].append(Event(a.job.choice_offset + j, text, len(row.token_ids)))
        for row in finished:
            jid, j = _job_of(row.key)
            a = self._active.get(jid)
            if a is None:
                continue
            final = self.sampler.finish(row, 0).text
            out.setdefault(jid, (a.job, []))[1].append(
                Event(
                    a.job.choice_offset + j,
                    a.trackers[j].finish(final),
                    len(row.token_ids),
                    row.finish_reason,
                    list(row.token_ids),
                    final,
                )
            )
            self.stats.finished_rows += 1
            a.left -= 1
            if a.left == 0:
                del self._active[jid]
        for job, events in out.values():
            self._emit(job, events)

    def _emit(self, job: Job, events: list[Event]) -> None:
        try:
            job.emit(events)
        except Exception:  # the receiver is gone (its event loop closed): stop generating for it
            log.debug("could not deliver to job %s; cancelling it", job.id, exc_info=True)
            with self._cond:
                self._cancels.add(job.id)

    def _fail(self, job: Job, message: str) -> None:
        self._active.pop(job.id, None)
        self.stats.failed_jobs += 1
        self._emit(
            job,
            [
                Event(c, "", 0, "error", error=message)
                for c in range(job.choice_offset, job.choice_offset + job.params.n)
            ],
        )

    def _fail_all(self, message: str) -> None:
        for a in list(self._active.values()):
            self._fail(a.job, message)


def _job_of(key) -> tuple[int, int]:
    """A row's (job id, sample index): the batch keys rows `job_id`, or `(job_id, j)` when n > 1."""
    return key if isinstance(key, tuple) else (key, 0)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Wait until the engine runs nothing and has nothing waiting (tests and benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        load = engine.load()
        if not load["running_rows"] and not load["waiting_jobs"] and not engine._active:
            return True
        time.sleep(0.01)
    return False
