"""How a sandbox worker process starts: inside bubblewrap (`bwrap`), or as a plain process with resource limits only
(`process`, an explicit opt-in). Both run the same zygote (worker.py); this module builds its command line and says
whether a backend can run here, with a one-line reason when it cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from r1lab.config import ConfigError

__all__ = [
    "BACKENDS",
    "UID_BASE",
    "SandboxUnavailable",
    "default_backend",
    "set_default_backend",
    "unavailable",
    "require",
    "worker_command",
    "python_runtime",
]

BACKENDS = ("bwrap", "process")
# As root, slot i's programs run as uid UID_BASE + i: a uid no account uses, so RLIMIT_NPROC counts exactly that
# slot's processes and nothing the program does can act as root (as root, writable /proc/sys files stay writable
# with no capabilities at all).
UID_BASE = 1_930_000_000
WORKER = Path(__file__).with_name("worker.py")
INSTALL = (
    "r1lab runs untrusted code only in a sandbox, and bubblewrap (bwrap) {why}: install it (apt-get install "
    "bubblewrap, or your distribution's bubblewrap package) or pass --sandbox process (R1LAB_SANDBOX="
    "process) to run programs with resource limits only, without filesystem or network isolation"
)

_default: str | None = None


class SandboxUnavailable(ConfigError):
    """The chosen sandbox cannot run here; the message names the fix and the opt-in."""


def default_backend() -> str:
    """The backend used when none is named: set_default_backend's, else $R1LAB_SANDBOX, else bwrap."""
    name = _default or os.environ.get("R1LAB_SANDBOX") or "bwrap"
    if name not in BACKENDS:
        raise ConfigError(f"unknown sandbox {name!r} (from R1LAB_SANDBOX); choose one of {', '.join(BACKENDS)}")
    return name


def set_default_backend(name: str | None) -> None:
    """Choose the backend for this process (the command's --sandbox); None restores the default."""
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"--sandbox must be one of {', '.join(BACKENDS)} (got {name!r})")
    global _default
    _default = name


def unavailable(backend: str | None = None) -> str | None:
    """Why `backend` cannot run here (one line), or None when it can."""
    backend = backend or default_backend()
    if backend == "process":
        return None
    return _bwrap_problem()


def require(backend: str | None = None) -> str:
    """The backend name, or SandboxUnavailable with the fix when it cannot run here."""
    backend = backend or default_backend()
    why = unavailable(backend)
    if why:
        raise SandboxUnavailable(why)
    return backend


@lru_cache(maxsize=1)
def _bwrap_problem() -> str | None:
    exe = shutil.which("bwrap")
    if exe is None:
        return INSTALL.format(why="is not installed")
    probe = [
        exe,
        "--unshare-net",
        "--unshare-pid",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "true",
    ]
    if os.geteuid() != 0:
        probe[1:1] = ["--unshare-user"]
    try:
        run = subprocess.run(probe, capture_output=True, text=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as e:
        return INSTALL.format(why=f"could not be started ({e})")
    if run.returncode != 0:
        tail = " ".join(run.stderr.split())[-200:]
        return INSTALL.format(
            why=f"cannot create namespaces here ({tail or f'exit code {run.returncode}'}; user "
            f"namespaces may be disabled)"
        )
    return None


def python_runtime() -> tuple[str, list[str]]:
    """The interpreter programs run on (this one, resolved past virtualenv links) and the directories it needs."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    dirs = [prefix]
    if not exe.startswith(prefix + os.sep):
        dirs.append(os.path.dirname(exe))
    return exe, dirs


def worker_command(backend: str, slot: int) -> list[str]:
    """The command that starts slot `slot`'s zygote under `backend`."""
    exe, dirs = python_runtime()
    root = os.geteuid() == 0
    cfg = json.dumps({"mode": backend, "uid": UID_BASE + slot if root else -1})
    if backend == "process":
        return [exe, "-I", "-S", str(WORKER), cfg]
    cmd = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        "sandbox",
    ]
    if not root:
        cmd.append("--unshare-user")
    for top in ("usr", "bin", "sbin", "lib", "lib32", "lib64"):  # the system's programs and libraries, read-only
        path = Path("/") / top
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    for d in dirs:
        if not d.startswith(("/usr/", "/bin/", "/lib")):
            for parent in reversed(Path(d).parents[:-1]):  # e.g. /root, made traversable (bwrap copies 0700)
                cmd += ["--perms", "0755", "--dir", str(parent)]
            cmd += ["--ro-bind", d, d]
    cmd += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--dir",
        "/work",
        "--dir",
        "/tmp",
        "--dir",
        "/out",
        "--ro-bind",
        str(WORKER),
        "/sandbox/worker.py",
        "--chdir",
        "/",
    ]
    # The zygote and its per-job judge keep what they need to build each program's namespaces, files, uid and
    # kill it; the program drops all of it before it runs.
    cmd += ["--cap-drop", "ALL"]
    for cap in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_KILL"):
        cmd += ["--cap-add", cap]
    return cmd + [exe, "-I", "-S", "/sandbox/worker.py", cfg]
