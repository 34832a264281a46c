"""The process that runs inside a sandbox and executes programs, one at a time (standard library only).

A zygote: it starts once per pool worker, imports what programs commonly need, then forks one child per job, so a
program pays a fork, not an interpreter start-up. The zygote itself never reads a job (the forked child does), so
no program's source, tests or output ever sit in the memory the next program is forked from.

Per job, the child (the "judge", trusted) reads the job from stdin, gives the program a fresh mount, PID and IPC
namespace with its own tmpfs work directory (bwrap mode) or a fresh temporary directory (process mode), forks the
program's process, waits for it under the wall-clock limit and writes the result to stdout. The program's process
mounts its own /proc, applies the resource limits, gives up root (a dedicated uid) or every capability, and runs the
program and its tests in a fresh `__main__`. When it ends or is killed, the kernel kills everything left in its PID
namespace; process mode kills the tree through a subreaper instead.

Frames on stdin and stdout are a 4-byte big-endian length and UTF-8 JSON.
"""

# Imported once here, so that programs do not pay for them (all forks share these pages).
import builtins  # noqa: F401
import collections  # noqa: F401
import ctypes
import functools  # noqa: F401
import heapq  # noqa: F401
import itertools  # noqa: F401
import json
import math  # noqa: F401
import os
import random
import re  # noqa: F401
import resource
import select
import shutil
import signal
import string  # noqa: F401
import struct
import sys
import tempfile
import time
import traceback
import types
import typing  # noqa: F401

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 8, 38, 36
CAP_DAC_READ_SEARCH = 2
EXIT_EOF = 3  # the judge's exit code when the pool closed the pipe: the zygote stops
TAIL = 4096  # bytes of stdout and stderr sent back
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags):
    _check(libc.unshare(flags), "unshare")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prctl(option, value):
    _check(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def drop_capabilities(keep=0):
    """Set the effective and permitted sets to `keep` (a mask of the first 32 capabilities), inheritable to none."""
    header = struct.pack("Ii", 0x20080522, 0)
    data = ctypes.create_string_buffer(struct.pack("6I", keep, keep, 0, 0, 0, 0), 24)
    _check(libc.capset(ctypes.c_char_p(header), data), "capset")


# ----------------------------------------------------------------------------- frames


def read_frame(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_frame(fd, obj):
    body = json.dumps(obj).encode()
    data = struct.pack(">I", len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


# ----------------------------------------------------------------------------- the program's process


def run_program(job, token, record_fd, main_path):
    """Run the program as `__main__`, then each test in its namespace; report through `record_fd`. Never returns."""

    def record(kind, value=""):
        try:
            os.write(record_fd, f"{token} {kind} {value}\n".encode())
        except OSError:
            pass

    module = types.ModuleType("__main__")
    module.__file__ = main_path
    sys.modules["__main__"] = module
    sys.argv = [main_path, *job["args"]]
    tests = job["tests"]
    code = 0
    try:
        exec(compile(job["source"], main_path, "exec"), module.__dict__)
    except SystemExit as e:
        code = _exit_code(e)
        if tests is not None:  # a program that exits before its tests ran has not passed them
            record("exited", code)
            code = code or 1
    except MemoryError as e:
        record("memory")
        _print_exception(e)
        code = 1
    except BaseException as e:
        _print_exception(e)
        code = 1
    if code == 0 and tests is not None:
        for i, test in enumerate(tests):
            try:
                exec(compile(test, f"<test {i}>", "exec"), module.__dict__)
                record("pass", i)
            except MemoryError as e:
                record("memory")
                record("fail", i)
                _print_exception(e)
            except BaseException as e:
                _print_exception(e)
                record("fail", i)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    record("done", code)
    os._exit(code)


def _print_exception(e):
    """The traceback as `python main.py` prints it: from the program's frames down, without this runner's."""
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)


def _exit_code(e):
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def become_program(job, cfg, files, record_fd, work):
    """In the forked program process: fresh /proc, the program's descriptors, limits, no privileges; then run."""
    limits = job["limits"]
    if cfg["mode"] == "bwrap":
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC)
        mount(None, "/proc/sys", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        os.setsid()
    for target, fd in enumerate(files):
        os.dup2(fd, target)
    os.dup2(record_fd, 3)
    os.closerange(4, 1 << 16)
    for name, value in (
        ("RLIMIT_CPU", (limits["cpu_seconds"], limits["cpu_seconds"] + 1)),
        ("RLIMIT_FSIZE", limits["output_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", limits["processes"] + cfg["nproc_base"]),
    ):
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))
    uid = cfg["uid"]
    if uid >= 0:
        process_mode = cfg["mode"] != "bwrap"
        if process_mode:
            prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to an unprivileged uid: the kernel clears every capability
        if process_mode:  # the host's files stay readable (the runtime may sit under /root), never writable
            drop_capabilities(keep=1 << CAP_DAC_READ_SEARCH)
    elif cfg["mode"] == "bwrap":
        drop_capabilities()
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which resets it
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    os.chdir(work)
    os.environ.clear()
    os.environ.update(PATH=ENV_PATH, HOME=work, TMPDIR=cfg["tmp"] or work, LANG="C.UTF-8")
    sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    random.seed()
    run_program(job, cfg["token"], 3, os.path.join(work, "main.py"))


# ----------------------------------------------------------------------------- the judge (one per job)


def judge(cfg):
    """Read one job, run it, write its result. The exit code tells the zygote how it went."""
    job = read_frame(0)
    if job is None:
        os._exit(EXIT_EOF)
    limits = job["limits"]
    if cfg["mode"] == "bwrap":
        unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        owner = "" if cfg["uid"] < 0 else f",uid={cfg['uid']},gid={cfg['uid']}"
        size = limits["disk_bytes"]
        mount("tmpfs", "/work", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0700{owner}")
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
        mount("tmpfs", "/out", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16m,mode=0700")
        work, out = "/work", "/out"
    else:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        work = tempfile.mkdtemp(prefix="r1lab-sandbox-")
        out = tempfile.mkdtemp(prefix="r1lab-sandbox-out-")
        if cfg["uid"] >= 0:
            os.chown(work, cfg["uid"], cfg["uid"])
    try:
        result = judge_job(job, cfg, work, out)
    finally:
        if cfg["mode"] != "bwrap":
            kill_descendants()
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    write_frame(1, result)
    os._exit(0)


def judge_job(job, cfg, work, out):
    limits = job["limits"]
    with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
        f.write(job["source"])
    stdin_path = os.path.join(out, "stdin")
    with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(job["stdin"])
    files = [os.open(stdin_path, os.O_RDONLY)]
    for name in ("stdout", "stderr"):
        files.append(os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    cfg = dict(
        cfg,
        token=os.urandom(16).hex(),
        tmp="/tmp" if cfg["mode"] == "bwrap" else None,
        nproc_base=0 if cfg["uid"] >= 0 else count_processes(os.getuid()),
    )
    record_r, record_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(record_r)
            become_program(job, cfg, files, record_w, work)
        except BaseException:
            traceback.print_exc(file=sys.__stderr__)
        os._exit(125)
    os.close(record_w)
    for fd in files:
        os.close(fd)
    records, killed = wait_program(pid, record_r, start + limits["wall_seconds"])
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime
    return verdict(job, cfg["token"], records, killed, status, wall, cpu, out)


def wait_program(pid, record_fd, deadline):
    """Drain the record pipe until the program exits or the deadline passes (then kill it: in bwrap mode the
    program is its PID namespace's init, so the kernel kills everything it left)."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(record_fd, select.POLLIN)
    data, killed, open_fds = bytearray(), False, {pidfd, record_fd}
    while pidfd in open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        for fd, _ in poller.poll(max(1, int(left * 1000))):
            if fd == record_fd:
                chunk = os.read(record_fd, 65536)
                if chunk and len(data) < 1 << 20:
                    data += chunk
                elif not chunk:
                    poller.unregister(record_fd)
                    open_fds.discard(record_fd)
            elif fd == pidfd:
                open_fds.discard(pidfd)
    os.set_blocking(record_fd, False)
    try:
        while len(data) < 1 << 20 and (chunk := os.read(record_fd, 65536)):
            data += chunk
    except BlockingIOError:
        pass
    os.close(record_fd)
    os.close(pidfd)
    return data.decode(errors="replace").splitlines(), killed


def verdict(job, token, records, killed, status, wall, cpu, out):
    limits, tests = job["limits"], job["tests"]
    kinds = collections.defaultdict(list)
    for line in records:
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] == token:
            kinds[parts[1]].append(parts[2] if len(parts) > 2 else "")
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sizes = [os.path.getsize(os.path.join(out, n)) for n in ("stdout", "stderr")]
    passed = len(set(kinds["pass"]))
    if killed:
        status_name, detail = "timeout", f"wall-clock limit of {limits['wall_seconds']} s"
    elif signum in (signal.SIGXCPU, signal.SIGKILL) and cpu >= limits["cpu_seconds"] - 0.05:
        status_name, detail = "timeout", f"CPU limit of {limits['cpu_seconds']} s"
    elif max(sizes) >= limits["output_bytes"]:
        status_name, detail = "output_limit", f"wrote {max(sizes)} bytes, limit {limits['output_bytes']}"
    elif kinds["memory"]:
        status_name, detail = "memory", f"address-space limit of {limits['memory_bytes']} bytes"
    elif exit_code == 0 and kinds["done"] and (tests is None or passed == len(tests)):
        status_name, detail = "passed", ""
    else:
        status_name = "failed"
        if exit_code == 125 and not kinds["done"]:
            detail = "the sandbox could not start the program"
            status_name = "error"
        elif kinds["exited"]:
            detail = f"the program exited (code {kinds['exited'][0]}) before its tests ran"
        elif signum is not None:
            detail = f"killed by signal {signal.Signals(signum).name}"
        elif not kinds["done"]:
            detail = f"exited with code {exit_code} without finishing"
        elif tests is not None:
            detail = f"{len(tests) - passed} of {len(tests)} tests failed"
        else:
            detail = f"exit code {exit_code}"
    return {
        "status": status_name,
        "exit_code": exit_code,
        "signal": signum,
        "detail": detail,
        "stdout": _tail(os.path.join(out, "stdout")),
        "stderr": _tail(os.path.join(out, "stderr")),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "tests_passed": passed if tests is not None else None,
        "tests_total": len(tests) if tests is not None else None,
    }


def _tail(path):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - TAIL))
        return f.read().decode("utf-8", errors="replace")


def count_processes(uid):
    """Processes of `uid` visible here (RLIMIT_NPROC counts them all, so the program's budget comes on top)."""
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return n


def kill_descendants(patience=5.0):
    """Process mode: kill every process left under this judge (orphans reparent to it, a subreaper), until none."""
    me, deadline = os.getpid(), time.monotonic() + patience
    while time.monotonic() < deadline:
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        children = [pid for pid, ppid in _parents() if ppid == me]
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)


def _parents():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                yield int(entry), int(stat[stat.rindex(b")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                pass


# ----------------------------------------------------------------------------- the zygote


def main():
    cfg = json.loads(sys.argv[1])
    if cfg["mode"] != "bwrap":
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # bwrap mode: --die-with-parent does this
    write_frame(1, {"ready": True, "python": sys.version.split()[0]})
    while True:
        pid = os.fork()  # forked before the job arrives: the child reads it, this process never does
        if pid == 0:
            try:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                judge(cfg)
            except BaseException:
                message = traceback.format_exc()
                try:
                    write_frame(1, {"status": "error", "detail": message[-2000:]})
                except OSError:
                    pass
                os._exit(2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_EOF:
            return
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 2)):
            write_frame(1, {"status": "error", "detail": f"the sandbox's judge died (wait status {status})"})


if __name__ == "__main__":
    main()
