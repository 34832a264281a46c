"""The sandbox against real attacks: each test runs a hostile program in the real sandbox and checks from the host
that the attack failed; after every test no process of the sandbox is left (every program runs under a sandbox
uid, so a scan of /proc for those uids finds any survivor)."""

from __future__ import annotations

import collections
import os
import shutil
import socket
import sys
import threading
import time
import uuid

import pytest

from r1lab import sandbox
from r1lab.sandbox import Limits, SandboxPool, backends

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and sandbox.unavailable("bwrap") is not None,
    reason=f"needs bubblewrap: {sandbox.unavailable('bwrap')}",
)

LIMITS = Limits(cpu_seconds=2, wall_seconds=2.0, memory_bytes=512 << 20, processes=16, output_bytes=1 << 20)
SANDBOX_UIDS = range(backends.UID_BASE, backends.UID_BASE + 4096)


def sandbox_processes() -> list[int]:
    """Host pids of processes running as a sandbox uid (every untrusted program does, when the pool runs as root)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in SANDBOX_UIDS:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def processes_with(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(entry))
            except OSError:
                pass
    return out


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    if os.geteuid() != 0:
        return
    deadline = time.monotonic() + 2.0
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"sandbox processes left running: {left}"


@pytest.fixture(scope="module")
def bwrap_pool():
    if sandbox.unavailable("bwrap"):
        if os.environ.get("CI"):
            pytest.fail(f"CI must install bubblewrap (scripts/setup.sh does as root): {sandbox.unavailable('bwrap')}")
        pytest.skip(sandbox.unavailable("bwrap"))
    with SandboxPool(workers=2, backend="bwrap", limits=LIMITS) as pool:
        yield pool


@pytest.fixture(scope="module")
def process_pool():
    with SandboxPool(workers=2, backend="process", limits=LIMITS) as pool:
        yield pool


@pytest.fixture(params=["bwrap", "process"])
def any_pool(request):
    return request.getfixturevalue(f"{request.param}_pool")


# ----------------------------------------------------------------------------- what a program gets


def test_program_gets_stdin_and_arguments_and_tests_are_counted(bwrap_pool):
    r = bwrap_pool.run(
        "import sys\nprint(sys.argv[1:], input()[::-1])\ndef f(x): return x + 1",
        stdin="abc\n",
        args=["-n", 3],
        tests=["assert f(1) == 2", "assert f(2) == 4", "assert f(0) == 1"],
    )
    assert r.status == "failed" and (r.tests_passed, r.tests_total) == (2, 3)
    assert r.stdout == "['-n', '3'] cba\n"
    assert "AssertionError" in r.stderr and "<test 1>" in r.stderr
    ok = bwrap_pool.run("def f(x): return x + 1", tests=["assert f(1) == 2"])
    assert ok.passed and ok.exit_code == 0 and (ok.tests_passed, ok.tests_total) == (1, 1)


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_exiting_before_the_tests_is_not_a_pass(bwrap_pool, exit_call):
    r = bwrap_pool.run(f"def f(x): return 0\n{exit_call}", tests=["assert f(1) == 2"])
    assert r.status == "failed" and r.tests_passed == 0


def test_each_program_gets_a_fresh_work_directory_and_tmp():
    with SandboxPool(workers=1, backend="bwrap", limits=LIMITS) as pool:
        first = pool.run(
            "open('left.txt', 'w').write('x'); open('/tmp/left.txt', 'w').write('x')\nimport os; print(os.getcwd())"
        )
        second = pool.run("import os; print(sorted(os.listdir('.')), os.listdir('/tmp'))")
    assert first.passed and first.stdout.strip() == "/work"
    assert second.stdout.strip() == "['main.py'] []"


# ----------------------------------------------------------------------------- isolation (bwrap)


def test_network_connecting_to_a_port_the_host_listens_on_fails(bwrap_pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = bwrap_pool.run(
            "import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), "
            "timeout=1)\n    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)",
            args=[port],
        )
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert r.passed and r.stdout.strip() == "ConnectionRefusedError"


def test_reading_a_file_planted_outside_the_sandbox_fails(bwrap_pool, tmp_path):
    secret = uuid.uuid4().hex
    planted = tmp_path / "secret.txt"
    planted.write_text(secret)
    home = os.path.expanduser("~")
    r = bwrap_pool.run(
        "import os, sys\nfor p in sys.argv[1:]:\n    try:\n        print(open(p).read())\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
        "print(os.path.exists(sys.argv[2]), sorted(os.listdir('/')))",
        args=[str(planted), home, "/etc/passwd"],
    )
    assert secret not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0] == "FileNotFoundError" and lines[2] == "FileNotFoundError"
    assert "etc" not in lines[-1] and "home" not in lines[-1]


def test_writing_outside_the_work_directory_fails(bwrap_pool, tmp_path):
    marker = f"r1lab-escape-{uuid.uuid4().hex}"
    runtime = backends.python_runtime()[1][0]
    targets = [str(tmp_path / marker), f"{runtime}/{marker}", f"/usr/lib/{marker}", f"/{marker}", f"/proc/sys/{marker}"]
    r = bwrap_pool.run(
        "import sys\nfor p in sys.argv[1:]:\n    try:\n"
        "        open(p, 'w').write('x')\n        print('wrote')\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
        f"open('/tmp/{marker}', 'w').write('x')",
        args=targets,
    )
    assert r.passed, r
    assert "wrote" not in r.stdout, r.stdout
    for path in targets + [f"/tmp/{marker}"]:
        assert not os.path.exists(path), path


def test_an_environment_variable_of_the_parent_is_not_visible(monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("R1LAB_TEST_API_KEY", secret)
    with SandboxPool(workers=1, backend="bwrap", limits=LIMITS) as pool:
        r = pool.run(
            "import os\nprint(dict(os.environ))\nfor p in ('/proc/self/environ', '/proc/1/environ'):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n"
            "        print(type(e).__name__)"
        )
    assert r.passed and secret not in r.stdout and "R1LAB_TEST_API_KEY" not in r.stdout


def test_listing_processes_shows_only_the_program(bwrap_pool):
    r = bwrap_pool.run(
        "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(pids)\n"
        "print([open(f'/proc/{p}/cmdline', 'rb').read() for p in pids])"
    )
    assert r.passed
    assert r.stdout.splitlines()[0] == "['1']"
    assert "pytest" not in r.stdout  # pid 1 is the program itself (a fork of the sandbox's worker)


def test_signalling_the_parent_and_everyone_fails(bwrap_pool):
    r = bwrap_pool.run(
        "import os, signal, sys\nfor pid in (int(sys.argv[1]), os.getppid()):\n    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n        print('sent', pid)\n    except OSError as e:\n"
        "        print(type(e).__name__)\nos.kill(-1, signal.SIGKILL)\nprint('survived')",
        args=[os.getpid()],
    )
    # getppid() is 0 outside the program's PID namespace: kill(0) would hit its own group, so it is no parent
    assert r.stdout.splitlines()[0] == "ProcessLookupError"
    assert bwrap_pool.run("print('still serving')").stdout == "still serving\n"


# ----------------------------------------------------------------------------- resource limits (both backends)


def test_an_environment_variable_of_the_parent_is_not_visible_to_process_backend(process_pool, monkeypatch):
    monkeypatch.setenv("R1LAB_TEST_API_KEY", "not-for-programs")
    r = process_pool.run("import os; print(sorted(os.environ))")
    assert r.passed and r.stdout.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_an_infinite_cpu_loop_is_killed_at_the_limit(any_pool):
    r = any_pool.run("while True: pass")
    assert r.status == "timeout" and r.wall_seconds < LIMITS.wall_seconds + 1.0, r


def test_a_sleeping_loop_is_killed_at_the_wall_clock_limit(any_pool):
    r = any_pool.run("import time\nwhile True: time.sleep(1)")
    assert r.status == "timeout" and LIMITS.wall_seconds <= r.wall_seconds < LIMITS.wall_seconds + 1.0, r
    assert "wall-clock" in r.detail


def test_allocating_10_gb_stops_at_the_memory_limit(any_pool):
    r = any_pool.run("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert r.status == "memory" and "allocated" not in r.stdout, r


def test_100_mb_of_output_stops_at_the_output_limit(any_pool):
    start = time.monotonic()
    r = any_pool.run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)")
    assert r.status == "output_limit", r
    assert len(r.stdout) <= 4096 and time.monotonic() - start < 5


def test_a_fork_bomb_is_capped_and_killed(any_pool):
    if os.geteuid() != 0:
        pytest.skip("counting the bomb's processes needs the sandbox uids (root)")
    peak = []
    stop = threading.Event()

    def watch():  # RLIMIT_NPROC is per uid, and each worker slot has its own: count the busiest slot's
        while not stop.is_set():
            uids = []
            for pid in sandbox_processes():
                try:
                    uids.append(os.stat(f"/proc/{pid}").st_uid)
                except OSError:
                    pass
            peak.append(max(collections.Counter(uids).values(), default=0))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = any_pool.run(
            "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)"
        )
    finally:
        stop.set()
        watcher.join()
    assert r.status == "timeout", r
    assert 1 < max(peak) <= LIMITS.processes, max(peak)
    assert any_pool.run("print(1)").passed


def test_a_double_forked_setsid_daemon_does_not_outlive_the_program(any_pool):
    marker = f"{time.time_ns() % 10**9}.{os.getpid()}"
    r = any_pool.run(
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        os.execv('/bin/sleep', ['sleep', sys.argv[1]])\n    os._exit(0)\n"
        "os.wait()\nprint('parent done')",
        args=[marker],
    )
    assert r.passed and r.stdout == "parent done\n", r
    deadline = time.monotonic() + 2.0
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not processes_with(marker)


# ----------------------------------------------------------------------------- the pool


def test_submit_never_blocks_and_results_come_back_in_parallel(bwrap_pool):
    start = time.monotonic()
    futures = [bwrap_pool.submit(f"import time; time.sleep(0.5); print({i})") for i in range(4)]
    assert time.monotonic() - start < 0.1
    results = [f.result() for f in futures]
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert time.monotonic() - start < 1.9  # two workers: about 1 s, never the 2 s of one at a time


def test_a_worker_that_dies_mid_job_is_an_error_and_is_replaced():
    others = set(_children(os.getpid()))
    with SandboxPool(workers=1, backend="bwrap", limits=LIMITS) as pool:
        assert pool.run("print(1)").passed
        (worker,) = set(_children(os.getpid())) - others
        future = pool.submit("import time; time.sleep(1.5)")
        time.sleep(0.3)
        os.kill(worker, 9)
        r = future.result()
        assert r.status == "error" and not r.judged, r
        assert pool.run("print(2)").stdout == "2\n"


def test_closing_the_pool_leaves_no_worker_process():
    before = set(_children(os.getpid()))
    pool = SandboxPool(workers=2, backend="bwrap", limits=LIMITS)
    assert all(f.result().passed for f in [pool.submit("print(1)") for _ in range(4)])
    ours = set(_children(os.getpid())) - before
    assert len(ours) == 2 and all(b"bwrap" in _cmdline(pid) for pid in ours)
    pool.close()
    assert not [pid for pid in ours if os.path.exists(f"/proc/{pid}")]


def test_without_bubblewrap_untrusted_code_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    backends._bwrap_problem.cache_clear()
    try:
        why = sandbox.unavailable("bwrap")
        assert why and "install" in why and "bubblewrap" in why and "--sandbox process" in why
        assert "\n" not in why
        with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
            SandboxPool(backend="bwrap")
        monkeypatch.setattr(backends, "_default", "bwrap")
        r = sandbox.run("print(1)")
        assert r.status == "unavailable" and not r.judged and "bubblewrap" in r.detail
        assert sandbox.unavailable("process") is None
    finally:
        monkeypatch.undo()
        backends._bwrap_problem.cache_clear()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat", "rb").read()
                if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, ValueError):
                pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
