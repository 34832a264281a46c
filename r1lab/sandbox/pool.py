"""A pool of sandbox workers: `submit` returns a Future at once, `run` waits; one worker per core by default.

Each worker is one long-lived zygote (worker.py) in its own sandbox, fed one job at a time by a thread of this
process; programs are forked from it, so none pays an interpreter start-up. A worker that dies, hangs past the
wall-clock limit or answers nonsense is killed and replaced, and its job comes back as status "error".
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import IO

from r1lab.sandbox.backends import SandboxUnavailable, default_backend, require, unavailable, worker_command

__all__ = ["Limits", "Result", "SandboxPool", "STATUSES", "run", "submit", "default_pool", "close_default_pool"]

STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "error", "unavailable")
GRACE_S = 5.0  # how long past its wall-clock limit a worker may take to answer before it is replaced


@dataclass(frozen=True)
class Limits:
    """What one program may use; reaching a limit ends the program and everything it started."""

    cpu_seconds: int = field(default=5, metadata={"help": "CPU seconds of the program's own process (RLIMIT_CPU)"})
    wall_seconds: float = field(default=10.0, metadata={"help": "wall-clock seconds before the whole tree is killed"})
    memory_bytes: int = field(default=1 << 30, metadata={"help": "address space per process (RLIMIT_AS)"})
    processes: int = field(default=32, metadata={"help": "processes at once, the program included (RLIMIT_NPROC)"})
    output_bytes: int = field(default=1 << 20, metadata={"help": "largest file, stdout and stderr included"})
    open_files: int = field(default=64, metadata={"help": "open file descriptors per process (RLIMIT_NOFILE)"})
    disk_bytes: int = field(default=32 << 20, metadata={"help": "size of the work directory and of /tmp (bwrap)"})

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name} must be > 0 (got {value})")


@dataclass
class Result:
    """What happened to one program. `stdout`/`stderr` are their last 4 KiB; test counts are None without tests."""

    status: str  # one of STATUSES
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    tests_passed: int | None = None
    tests_total: int | None = None
    detail: str = ""  # why, in words: which limit, which tests, what broke

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def judged(self) -> bool:
        """False when the sandbox itself could not judge the program (unavailable, or an infrastructure error)."""
        return self.status not in ("error", "unavailable")


def _job(source: str, stdin: str, args: Sequence[str], tests: str | Sequence[str] | None, limits: Limits) -> dict:
    if not isinstance(source, str):
        raise TypeError(f"source must be a str of Python code (got {type(source).__name__})")
    if isinstance(tests, str):
        tests = [tests]
    return {
        "source": source,
        "stdin": stdin,
        "args": [str(a) for a in args],
        "tests": None if tests is None else [str(t) for t in tests],
        "limits": asdict(limits),
    }


class _Worker:
    """One zygote process and the pipes to it; restarted on any failure."""

    def __init__(self, backend: str, slot: int):
        self.backend, self.slot = backend, slot
        self.proc: subprocess.Popen | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            worker_command(self.backend, self.slot),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={},
            bufsize=0,
        )
        ready = self._read(time.monotonic() + 30)
        if not (isinstance(ready, dict) and ready.get("ready")):
            raise RuntimeError(f"the {self.backend} sandbox did not start: {self._log_tail() or ready}")

    def run(self, job: dict) -> Result:
        try:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            body = json.dumps(job).encode()
            assert self.proc is not None and self.proc.stdin is not None  # started just above
            self.proc.stdin.write(struct.pack(">I", len(body)) + body)
            answer = self._read(time.monotonic() + job["limits"]["wall_seconds"] + GRACE_S)
            if not isinstance(answer, dict) or answer.get("status") not in STATUSES:
                raise RuntimeError(f"the sandbox worker answered {answer!r:.200}")
            if answer["status"] == "error":
                self.stop()  # its state is unknown: start a fresh one for the next job
            return Result(**answer)
        except Exception as e:  # noqa: BLE001 - any failure of the machinery is this job's "error", never a crash
            detail = f"{type(e).__name__}: {e}"
            self.stop()
            return Result(status="error", detail=detail[:2000])

    def _read(self, deadline: float):
        head = self._read_exact(4, deadline)
        return json.loads(self._read_exact(struct.unpack(">I", head)[0], deadline))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd, data = self.proc.stdout.fileno(), b""
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("the sandbox worker did not answer in time")
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise RuntimeError(f"the sandbox worker exited: {self._log_tail() or 'no message'}")
            data += chunk
        return data

    def _log_tail(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return " ".join(self.log.read().decode(errors="replace").split())[-500:]

    def stop(self, wait: float = 0.0) -> None:
        """Close the zygote's stdin (it exits after its idle judge reads EOF); kill it if it lingers."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=wait) if wait else None
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            proc.kill()  # bwrap: --die-with-parent takes the namespace (and every program in it) down with it
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self.log is not None:
            self.log.close()
            self.log = None


class SandboxPool:
    """Runs untrusted Python programs in `workers` sandboxes at once (default: one per core).

    `submit(...)` never blocks and returns a Future of a Result; `run(...)` is submit + wait. A pool whose backend
    cannot run here raises SandboxUnavailable on creation, with the fix (install bubblewrap) and the opt-in."""

    def __init__(self, workers: int | None = None, backend: str | None = None, limits: Limits | None = None):
        self.backend = require(backend)
        self.workers = workers or len(os.sched_getaffinity(0))
        if self.workers < 1:
            raise ValueError(f"a sandbox pool needs workers >= 1 (got {self.workers})")
        self.limits = limits or Limits()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, args=(slot,), daemon=True, name=f"sandbox-{slot}")
            for slot in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self,
        source: str,
        *,
        stdin: str = "",
        args: Sequence[str] = (),
        tests: str | Sequence[str] | None = None,
        limits: Limits | None = None,
    ) -> Future:
        """Queue a program: `source` runs as `__main__` with `stdin` and `args` (sys.argv[1:]); then each test (Python
        source) runs in its namespace, and the program passes when it exits 0 and every test runs without raising."""
        if self._closed:
            raise RuntimeError("this sandbox pool is closed")
        future: Future = Future()
        self._jobs.put((_job(source, stdin, args, tests, limits or self.limits), future))
        return future

    def run(self, source: str, **kw) -> Result:
        """submit(...) and wait for the Result."""
        return self.submit(source, **kw).result()

    def _serve(self, slot: int) -> None:
        worker = _Worker(self.backend, slot)
        try:
            while (item := self._jobs.get()) is not None:
                job, future = item
                if future.set_running_or_notify_cancel():
                    future.set_result(worker.run(job))
        finally:
            worker.stop(wait=2.0)

    def close(self) -> None:
        """Stop every worker once the queued jobs are done; nothing of the sandboxes is left running after."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- one shared pool for the process

_pool: SandboxPool | None = None
_pool_lock = threading.Lock()


def default_pool() -> SandboxPool:
    """The process's shared pool, started on first use with the default backend (closed at exit)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._closed or _pool.backend != default_backend():
            if _pool is not None:
                _pool.close()
            _pool = SandboxPool()
        return _pool


def close_default_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


atexit.register(close_default_pool)


def submit(source: str, **kw) -> Future:
    """`SandboxPool.submit` on the shared pool; when the sandbox cannot run here, a Future that is already done
    with status "unavailable" and the reason (install bubblewrap, or opt in to --sandbox process)."""
    why = unavailable()
    if why:
        future: Future = Future()
        future.set_result(Result(status="unavailable", detail=why))
        return future
    try:
        return default_pool().submit(source, **kw)
    except SandboxUnavailable as e:
        future = Future()
        future.set_result(Result(status="unavailable", detail=str(e)))
        return future


def run(source: str, **kw) -> Result:
    """submit(...) on the shared pool and wait."""
    return submit(source, **kw).result()
