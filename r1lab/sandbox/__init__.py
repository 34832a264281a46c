"""Running untrusted Python (model-written programs and their tests) in a sandbox.

bwrap backend: each pool worker is a bubblewrap sandbox with no network, its own PID/IPC/UTS namespaces, a read-only
view of the system's libraries and the Python runtime, no home and no environment of the parent; each program gets a
fresh PID, mount and IPC namespace of its own with a fresh tmpfs work directory, an unprivileged uid (as root) or no
capabilities (otherwise), and resource limits; the whole process tree dies at the limit. The `process` backend (an
explicit opt-in) applies the resource limits and the clean environment only. See docs/sandbox.md.

    from r1lab.sandbox import SandboxPool
    with SandboxPool() as pool:
        result = pool.run("def f(x): return x + 1", tests=["assert f(1) == 2"])   # Result(status="passed", ...)
"""

from r1lab.sandbox.backends import (
    BACKENDS,
    SandboxUnavailable,
    default_backend,
    require,
    set_default_backend,
    unavailable,
)
from r1lab.sandbox.pool import STATUSES, Limits, Result, SandboxPool, close_default_pool, default_pool, run, submit

__all__ = [
    "BACKENDS",
    "STATUSES",
    "Limits",
    "Result",
    "SandboxPool",
    "SandboxUnavailable",
    "default_backend",
    "set_default_backend",
    "unavailable",
    "require",
    "default_pool",
    "close_default_pool",
    "run",
    "submit",
]
