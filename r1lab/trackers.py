"""Experiment trackers (`--report-to tensorboard,wandb,mlflow`): a run's metrics rows, its resolved config, sampled
completions and final evaluation, sent through each project's own library (optional extras: `r1lab[wandb]`, ...).

    tensorboard  <out>/tensorboard/ event files: every number as a scalar, the config and sample tables as text
    wandb        a W&B run (project $WANDB_PROJECT or r1lab; WANDB_MODE=offline writes <out>/wandb/ only): history,
                 config, a `samples` wandb.Table per logged step, the final evaluation in the run's summary
    mlflow       an MLflow run ($MLFLOW_TRACKING_URI or MLflow's default store, experiment $MLFLOW_EXPERIMENT_NAME
                 or r1lab): metrics by step, the config as params and config.yaml, samples/step_N.json tables

metrics.jsonl stays the record; trackers get the same rows (numbers only, nested keys joined with "/"). A run keeps
`<out>/trackers.json`: each tracker's run id and how many rows it holds. Resuming continues the same tracker runs:
rows a tracker already holds are not sent again (the resume continues exactly, so they are the same rows), and a
tracker added on resume first receives the kept rows it lacks; `--fresh` starts new tracker runs (TensorBoard purges
its earlier events). A tracker that cannot start is a one-line ConfigError before training; one that fails later
is dropped with a warning and training goes on. Under torchrun only rank 0 reports.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import yaml

from r1lab.config import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
STATE = "trackers.json"
EVAL_SETTINGS = ("k", "temperature", "top_p", "max_new_tokens")  # an evaluation summary's settings, not results


def check(names: list[str]) -> None:
    """Refuse an unknown tracker, or one whose library is not installed, naming the extra that installs it."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} (comma-separated)"
            )
    for name in names:
        modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(
                f"--report-to {name}: the {modules[0]} package is not installed; pip install 'r1lab[{name}]'"
            )


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics row, nested keys joined with '/'; `step` and non-numbers are left out."""
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (bool, int, float)) and name != "step" and math.isfinite(value):
            out[name] = float(value)
    return out


def evaluation_scalars(summary: dict) -> dict[str, float]:
    """The results of an evaluation summary (`r1lab.eval.evaluate`) as `final_eval/...` numbers."""
    return scalars({k: v for k, v in summary.items() if k not in EVAL_SETTINGS}, "final_eval/")


# ----------------------------------------------------------------------------- the adapters


class Tracker(Protocol):
    """What `Trackers` needs of an adapter: `state` (its run id...) is saved in trackers.json to resume it."""

    name: str
    state: dict

    def config(self, cfg: dict) -> None: ...

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def samples(self, step: int, columns: list[str], rows: list[list]) -> None: ...

    def evaluation(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, state: dict, fresh: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the same writer, from the standalone package
            from tensorboardX import SummaryWriter  # type: ignore[no-redef]
        # --fresh: a START event at step 0 makes TensorBoard's reader drop everything the earlier run wrote here
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=0 if fresh else None)
        self.state: dict = {}

    def config(self, cfg: dict) -> None:
        self.writer.add_text("config", _indent(yaml.safe_dump(cfg, sort_keys=False)), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, v in values.items():
            self.writer.add_scalar(key, v, step)
        self.writer.flush()

    def samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(_cell(v) for v in r) + " |\n" for r in rows)
        self.writer.add_text("samples", head + body, step)
        self.writer.flush()

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, state: dict, fresh: bool):
        import wandb

        self.wandb = wandb
        resume = {} if fresh or not state.get("id") else {"id": state["id"], "resume": "allow"}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "r1lab", name=run_name, dir=str(run_dir), **resume
        )
        self.state = {"id": self.run.id}

    def config(self, cfg: dict) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        self.run.log({"samples": self.wandb.Table(columns=list(columns), data=rows)}, step=step)

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)  # W&B keeps final figures in the summary (history steps only go forward)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, state: dict, fresh: bool):
        import mlflow
        from mlflow import MlflowClient

        uri = mlflow.get_tracking_uri()  # $MLFLOW_TRACKING_URI, else MLflow's default store
        self.client = MlflowClient(uri)
        run_id = state.get("run_id") if not fresh and state.get("tracking_uri") == uri else None
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self.new = False
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "r1lab"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            run_id = self.client.create_run(
                exp_id, run_name=run_name, tags={"r1lab.run_dir": str(run_dir.resolve())}
            ).info.run_id
            self.new = True
        self.run_id = run_id
        self.state = {"tracking_uri": uri, "run_id": run_id}

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted from the store, or another store: start a new run
            return False

    def config(self, cfg: dict) -> None:
        from mlflow.entities import Param

        if self.new:  # MLflow params cannot change once logged; a resumed run keeps its first config's params
            params = [Param(k, str(v)[:6000]) for k, v in _flat(cfg).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"samples/step_{step:07d}.json")

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


ADAPTERS: dict[str, Callable[[Path, str, dict, bool], Tracker]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "mlflow": MLflow,
}


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . / and space): pass@1 -> pass_at_1."""
    key = key.replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


# ----------------------------------------------------------------------------- the run's trackers


class Trackers:
    """The trackers one run directory reports to; empty (every call a no-op) when `names` is."""

    def __init__(self, names: list[str], run_dir: str | Path, fresh: bool = False):
        self.dir = Path(run_dir)
        self.path = self.dir / STATE
        self.active: list[Tracker] = []
        self.rows: dict[str, int] = {}  # rows of metrics.jsonl each tracker holds
        self.skip: dict[str, int] = {}  # rows still to leave out (held from before a resume)
        self.held_step: dict[str, int] = {}  # step of the last row left out: its samples are held too
        if not names:
            return
        _close_left_open(self.dir)
        if fresh:  # new tracker runs: forget the earlier ones
            self.path.unlink(missing_ok=True)
        saved = _read_state(self.path)
        for name in names:
            try:
                tracker = ADAPTERS[name](self.dir, str(self.dir), saved.get(name, {}), fresh)
            except ImportError as e:
                self.close(failed=True)
                raise ConfigError(f"--report-to {name}: {e}; pip install 'r1lab[{name}]'") from None
            except Exception as e:
                self.close(failed=True)
                raise ConfigError(f"--report-to {name} could not start: {_why(name, e)}") from None
            self.active.append(tracker)
            before = saved.get(name, {})  # the rows it holds, if this is the tracker run that received them
            same = {k: v for k, v in before.items() if k != "rows"} == tracker.state
            self.rows[name] = before.get("rows", 0) if same else 0
        _OPEN.append(self)

    def __bool__(self) -> bool:
        return bool(self.active)

    def begin(self, config: dict, kept: list[dict]) -> None:
        """Send the resolved config; line each tracker up with the `kept` rows of metrics.jsonl: the rows it lacks
        are sent now, and as many rows as it holds beyond them will not be sent again."""
        for t in list(self.active):
            have = self.rows[t.name]
            if not self._call(t, "config", config):
                continue
            if all(self._call(t, "log", row["step"], scalars(row)) for row in kept[have:]):
                self.rows[t.name] = max(have, len(kept))
                self.skip[t.name] = max(0, have - len(kept))
        self._save()

    def log(self, row: dict) -> None:
        """One metrics row (as written to metrics.jsonl)."""
        for t in list(self.active):
            if self.skip.get(t.name):
                self.skip[t.name] -= 1
                self.held_step[t.name] = row["step"]
                continue
            if self._call(t, "log", row["step"], scalars(row)):
                self.rows[t.name] += 1
        if self.active:
            self._save()

    def samples(self, step: int, rows: list[dict]) -> None:
        """Sampled completions as a table (rows of equal keys), unless that step's row was held from before."""
        if not rows:
            return
        columns = list(rows[0])
        table = [[r[c] for c in columns] for r in rows]
        for t in list(self.active):
            if step > self.held_step.get(t.name, -1):
                self._call(t, "samples", step, columns, table)

    def evaluation(self, step: int, summary: dict) -> None:
        """An evaluation summary (`r1lab.eval.evaluate`) as the run's final figures."""
        values = evaluation_scalars(summary)
        for t in list(self.active):
            self._call(t, "evaluation", step, values)

    def close(self, failed: bool = False) -> None:
        for t in self.active:
            try:
                t.close(failed)
            except Exception as e:  # closing must not hide the error that ended the run
                print(f"r1lab: --report-to {t.name}: closing failed ({_why(t.name, e)})", file=sys.stderr)
        self.active = []
        if self in _OPEN:
            _OPEN.remove(self)

    def _call(self, t: Tracker, method: str, *args) -> bool:
        """Call one tracker; one that fails mid-run is dropped with one warning (metrics.jsonl keeps every row)."""
        try:
            getattr(t, method)(*args)
            return True
        except Exception as e:
            print(
                f"r1lab: --report-to {t.name} stopped after an error ({_why(t.name, e)}); training goes on and "
                f"{self.dir / 'metrics.jsonl'} keeps every row",
                file=sys.stderr,
            )
            if t in self.active:
                self.active.remove(t)
            try:
                t.close(failed=True)
            except Exception:  # noqa: BLE001 - already reported above
                pass
            return False

    def _save(self) -> None:
        state = _read_state(self.path)
        for t in self.active:
            state[t.name] = {**t.state, "rows": self.rows[t.name]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.path)


def report_evaluation(run_dir: str | Path, names: list[str], summary: dict) -> bool:
    """Add an evaluation made after training (the pipeline's) to the tracker runs of `run_dir`, reopened from its
    trackers.json, at the run's last step. False when the run reported to none of `names`."""
    from r1lab.train.run import read_metrics

    run_dir = Path(run_dir)
    names = [n for n in names if n in _read_state(run_dir / STATE)]
    if not names:
        return False
    rows = read_metrics(run_dir / "metrics.jsonl")
    trackers = Trackers(names, run_dir)
    trackers.evaluation(max((r.get("step", 0) for r in rows), default=0), summary)
    trackers.close()
    return True


# ----------------------------------------------------------------------------- helpers

_OPEN: list[Trackers] = []


def _close_left_open(run_dir: Path) -> None:
    """A run of this directory that ended in an exception left its trackers open: close them as failed."""
    for t in [t for t in _OPEN if t.dir.resolve() == run_dir.resolve()]:
        t.close(failed=True)


@atexit.register
def _close_all() -> None:
    """Trackers still open at exit belong to a run that did not finish (an error, Ctrl-C): mark them failed."""
    for t in list(_OPEN):
        t.close(failed=True)


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _why(name: str, e: Exception) -> str:
    """The first line of a library's error, with what to do for the usual W&B cases."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    kind = type(e).__name__
    if name == "wandb" and kind == "UsageError" and "api key" in first.lower():
        return (
            f"{first} Log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to write the "
            "run locally (upload later with `wandb sync`)"
        )
    if name == "wandb" and kind == "CommError":
        return f"{first} Check the network, or set WANDB_MODE=offline to write the run locally"
    return f"{kind}: {first}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def _indent(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown renderer (a code block)."""
    return "".join("    " + line + "\n" for line in text.splitlines())


def _cell(v) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")
