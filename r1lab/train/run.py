"""A run directory: resolved config, metrics JSONL, the latest checkpoint with its trainer state, and resume.

    runs/<name>/config.yaml        the resolved config (defaults < YAML < flags)
    runs/<name>/metrics.jsonl      one JSON object per logged step
    runs/<name>/checkpoint/        model dir + trainer_state.pt (optimiser, schedule, RNG, step), atomic
    runs/<name>/model/             the final model with its model card (README.md), written when the stage completes
    runs/<name>/trackers.json      --report-to trackers' run ids and rows sent (r1lab.trackers)

Resuming from `checkpoint/` restores weights, optimiser, step and RNG, and truncates metrics logged after the
checkpoint, so an interrupted run continues exactly as if it had not stopped. Under torchrun every process calls
these methods and rank 0 alone writes (checkpoints gathered whole: they resume on any number of processes).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from r1lab import config as C
from r1lab import model_card
from r1lab.model.checkpoint import CheckpointError, atomic_dir, load_state, recover, save_model
from r1lab.trackers import Trackers
from r1lab.train import dist as D

STATE = "trainer_state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on safely (a non-finite loss or gradient); the message says what was kept and what to do."""


class Run:
    def __init__(self, out: str | Path, cfg=None, *, resume: bool = True):
        self.dir = Path(out)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise C.ConfigError(
                f"--out {self.dir} cannot be a run directory: it, or a folder above it, is a file; give another path"
            ) from None
        self.metrics_path = self.dir / "metrics.jsonl"
        self.resume = resume
        self.cfg = cfg
        self.trackers = Trackers([], self.dir)  # --report-to: started by train.loop.open_run, on rank 0 only
        if D.is_main():
            sweep_temporaries(self.dir)  # a write killed mid-way left a full-size temporary: this run owns the dir
            recover(self.checkpoint_dir)  # once, before other processes look
            recover(self.model_dir)
            if not resume:  # --fresh: start over, so no earlier checkpoint or final model can be mistaken for ours
                for d in (self.checkpoint_dir, self.model_dir):
                    shutil.rmtree(d, ignore_errors=True)
            if cfg is not None:
                C.save(cfg, self.dir / "config.yaml")
        D.barrier()
        self._t0 = time.perf_counter()
        self.saved_step: int | None = None  # the step of the checkpoint on disk, once saved or loaded

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def done(self) -> bool:
        """The stage finished before: its final model is there."""
        return (recover(self.model_dir) / "config.json").is_file()

    def save(self, model, tokenizer, step: int, optimizer=None, extra: dict | None = None) -> None:
        """Atomically write weights + trainer state (optimiser, step, RNG) to `checkpoint/`."""
        state = {"step": step, "rng": rng_state(), "extra": extra or {}}
        if D.active():  # each process's RNG, for a resume on as many processes
            state["rng_ranks"] = D.gather(rng_state())
        if optimizer is not None:
            state["optimizer"] = D.optimizer_state(optimizer)
        weights = D.model_state(model)
        if D.is_main():
            write_model(model, tokenizer, self.checkpoint_dir, extra_state=state, state_dict=weights)
        D.barrier()
        self.saved_step = step

    def load(self) -> dict | None:
        """The trainer state of the latest checkpoint (weights are loaded by the caller), or None."""
        state = None
        if self.resume and (recover(self.checkpoint_dir) / STATE).is_file():
            state = load_state(self.checkpoint_dir / STATE)
        elif self.resume and self.checkpoint_dir.is_dir():  # r1lab writes both at once: this one was damaged
            raise CheckpointError(
                f"{self.checkpoint_dir} has no {STATE}, so it cannot be resumed exactly; restore "
                "it, or start over with --fresh"
            )
        steps = D.gather(state["step"] if state else None)
        if len(set(steps)) > 1:
            raise CheckpointError(
                f"processes see different checkpoints in {self.checkpoint_dir} (steps {steps} by "
                "rank); put --out on a filesystem that every node shares"
            )
        if state is None:  # a start from step 0: rows an earlier (killed or --fresh) run logged here are stale
            self.truncate_metrics(-1)
            return None
        ranks = state.pop("rng_ranks", None)
        if D.active() and ranks and len(ranks) == D.world():
            state["rng"] = ranks[D.rank()]
        self.truncate_metrics(state["step"])
        self.saved_step = state["step"]
        return state

    def check_finite(self, step: int, **values) -> None:
        """Stop before an optimiser step that would write NaN or inf into the weights: nothing of step `step` is
        applied, and the checkpoint on disk (if any) stays the last good one."""
        bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
        if not bad:
            return
        kept = (
            f"the last good checkpoint, step {self.saved_step}, is in {self.checkpoint_dir} (re-running resumes "
            "from it)"
            if self.saved_step is not None
            else "no checkpoint was written yet"
        )
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise TrainingError(
            f"step {step}: {what}; stopped before updating the weights, and {kept}. Lower --lr or "
            "check the data and rewards"
        )

    def finish(self, model, tokenizer) -> Path:
        """Write the final model with its model card, and close the trackers."""
        weights = D.model_state(model)
        if D.is_main():
            card = self._card(model)
            write_model(
                model, tokenizer, self.model_dir, state_dict=weights, files={"README.md": card} if card else None
            )
        D.barrier()
        self.trackers.close()
        return self.model_dir

    def _card(self, model) -> str | None:
        """The final model's card (r1lab.model_card); a failure to render one is reported and costs no model."""
        if self.cfg is None:
            return None
        try:
            return model_card.render(self.cfg, model, self.metrics())
        except Exception as e:  # noqa: BLE001 - the trained weights matter more than their description
            print(f"r1lab: the model card was not written ({type(e).__name__}: {e})", file=sys.stderr)
            return None

    # ------------------------------------------------------------------ metrics
    def log(self, step: int, **metrics) -> dict:
        row = {"step": step, "time": round(time.perf_counter() - self._t0, 3), **_plain(metrics)}
        if D.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.trackers.log(row)
        return row

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Sampled completions (rows of equal keys) for the trackers' sample tables; metrics.jsonl keeps none."""
        self.trackers.samples(step, samples)

    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Keep only rows logged up to `step` (the checkpoint's), so the file matches the checkpoint exactly: the
        resumed run logs the later steps again. -1 empties it."""
        if not D.is_main():
            return
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.metrics_path)


def write_model(
    model,
    tokenizer,
    path: Path,
    extra_state: dict | None = None,
    state_dict: dict | None = None,
    files: dict[str, str] | None = None,
) -> None:
    """Save a native or transformers model (and tokenizer, and trainer state, and text `files` such as the model
    card) as one atomic directory; `state_dict` replaces the model's own (whole weights gathered from FSDP shards)."""
    from r1lab.model.deepseek import DeepseekV3

    if isinstance(model, DeepseekV3):
        extra: dict[str, object] = {**(files or {}), **({STATE: extra_state} if extra_state else {})}
        save_model(model, path, tokenizer=tokenizer, extra=extra or None, state_dict=state_dict)
        return

    def fill(tmp: Path):
        unwrapped = getattr(model, "module", model)
        if hasattr(unwrapped, "merge_and_unload") and extra_state is None:
            unwrapped = unwrapped.merge_and_unload()  # LoRA: a plain model on export
        if state_dict is not None:
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        else:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra_state is not None:
            torch.save(extra_state, tmp / STATE)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    atomic_dir(path, fill)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics file. A torn last line (the process died, or the disk filled, while writing it) is left
    out: the resume that follows rewrites the file up to its checkpoint. A bad line before the last is damage."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
            rows.append(row)
        except ValueError:
            if i == len(lines):
                break
            raise CheckpointError(
                f"{path}:{i} is not valid JSON; the metrics file is damaged (delete it to start "
                "its log over, or use --fresh)"
            ) from None
    return rows


def sweep_temporaries(run_dir: Path) -> list[Path]:
    """Remove what interrupted atomic writes left in a run directory (`.checkpoint.tmp-*`, `.model.tmp-*`,
    `metrics.tmp`); returns what was removed."""
    gone = []
    for p in list(run_dir.glob(".*.tmp-*")) + list(run_dir.glob("*.tmp")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))


def _plain(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, float):
            v = float(f"{v:.6g}")
        out[k] = v
    return out


def cosine_lr(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_ratio * lr` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_optimizer(cfg) -> None:
    """Refuse schedule and optimiser settings that would train silently wrong: lr <= 0, a negative warm-up or
    weight decay, min_lr_ratio outside [0, 1], and grad_clip <= 0 (torch scales the gradient by clip / norm, so 0
    zeroes it and a negative clip turns descent into ascent)."""
    if not cfg.lr > 0:
        raise C.ConfigError(f"lr must be > 0 (got {cfg.lr})")
    if cfg.warmup < 0 or cfg.weight_decay < 0:
        raise C.ConfigError(f"warmup and weight_decay must be >= 0 (got {cfg.warmup}, {cfg.weight_decay})")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise C.ConfigError(
            f"min_lr_ratio must be in [0, 1]: the cosine ends at lr x min_lr_ratio (got {cfg.min_lr_ratio})"
        )
    if not cfg.grad_clip > 0:
        raise C.ConfigError(f"grad_clip must be > 0: the largest gradient norm kept, 1.0 usually (got {cfg.grad_clip})")


def adamw(model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms, biases or the balancing bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas
    )
