"""A run's metrics JSONL -> plots (PNG) and a report (report.md, and report.html with the plots inlined)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from r1lab.train.run import read_metrics

CURVES = [  # (metric key in grpo/metrics.jsonl, title, percent axis)
    ("reward_mean", "reward (mean per step)", False),
    ("accuracy", "accuracy of the sampled replies", True),
    ("mean_length", "mean reply length (tokens)", False),
    ("think_share", "share of replies that think", True),
    ("kl", "KL to the reference policy", False),
    ("entropy", "policy entropy per token", False),
]


def plot_curves(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, title, pct in CURVES:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        steps, vals = zip(*pts)
        fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
        ax.plot(steps, [100 * v for v in vals] if pct else vals, color="#3b6fb6", lw=1.2, alpha=0.45)
        if len(vals) >= 5:  # a moving average makes the trend readable
            w = max(3, len(vals) // 10)
            smooth = [sum(vals[max(0, i - w + 1): i + 1]) / len(vals[max(0, i - w + 1): i + 1]) for i in range(len(vals))]
            ax.plot(steps, [100 * v for v in smooth] if pct else smooth, color="#1d3f73", lw=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step", fontsize=9)
        if pct:
            ax.set_ylabel("%", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_before_after(summary: dict, out_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("pass@1", "pass@1"), ("greedy", "greedy"), ("cons@k", "cons@k"), ("think_share", "thinks")]
    b = [100 * (summary["base"][k] or 0) for k, _ in keys]
    f = [100 * (summary["final"][k] or 0) for k, _ in keys]
    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], b, width=0.4, label="base model", color="#9aa7b8")
    ax.bar([i + 0.2 for i in x], f, width=0.4, label="after GRPO", color="#1d3f73")
    for i, (bv, fv) in enumerate(zip(b, f)):
        ax.text(i - 0.2, bv + 1, f"{bv:.0f}", ha="center", fontsize=8)
        ax.text(i + 0.2, fv + 1, f"{fv:.0f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [name for _, name in keys])
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"held-out {summary['task']}: before and after RL", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "before_after.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, summary: dict) -> tuple[Path, Path]:
    """report.md (plots linked) and report.html (plots inlined) in the run directory."""
    from r1lab.recipes import render_summary

    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    rows = read_metrics(run_dir / "grpo" / "metrics.jsonl")
    curve_paths = plot_curves(rows, plots)
    ba = plot_before_after(summary, plots)
    table = render_summary(summary)
    examples = _examples(run_dir)
    md = [f"# r1lab report: {summary['recipe']}", "", "```", table, "```", "",
          f"![before and after](plots/{ba.name})", ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in curve_paths]
    if examples:
        md += ["", "## Replies to the same held-out problem, before and after RL", ""]
        for title, text in examples:
            md += [f"**{title}**", "", "```", text, "```", ""]
    md += ["", f"Stage times (s): {json.dumps(summary['stage_seconds'])}", ""]
    (run_dir / "report.md").write_text("\n".join(md))

    def img(p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<img alt="{p.stem}" src="data:image/png;base64,{data}">'

    parts = [f"<h1>r1lab report: {html.escape(summary['recipe'])}</h1>", f"<pre>{html.escape(table)}</pre>",
             img(ba), "<h2>GRPO over steps</h2>", "<div class=grid>" + "".join(img(p) for p in curve_paths) + "</div>"]
    if examples:
        parts.append("<h2>Replies to the same held-out problem, before and after RL</h2>")
        parts += [f"<h3>{html.escape(t)}</h3><pre>{html.escape(x)}</pre>" for t, x in examples]
    parts.append(f"<p>Stage times (s): {html.escape(json.dumps(summary['stage_seconds']))}</p>")
    page = ("<!doctype html><meta charset=utf-8><title>r1lab report</title><style>body{font-family:system-ui,"
            "sans-serif;max-width:1100px;margin:2em auto;color:#1b1f24}pre{background:#f4f6f8;padding:1em;"
            "overflow:auto}.grid{display:flex;flex-wrap:wrap;gap:8px}img{max-width:100%}</style>" + "".join(parts))
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.md", run_dir / "report.html"


def _examples(run_dir: Path, n: int = 2) -> list[tuple[str, str]]:
    """Greedy replies of the base and RL models to the first held-out problems."""
    try:
        base = json.loads((run_dir / "eval_base.json").read_text())["records"]
        final = json.loads((run_dir / "eval_final.json").read_text())["records"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return []
    out = []
    for b, f in list(zip(base, final))[:n]:
        if b.get("skipped") or not b.get("greedy"):
            continue
        out.append((f"{b['prompt']} (gold {b['gold']}), base model", b["greedy"]["text"].strip()))
        out.append((f"{f['prompt']} (gold {f['gold']}), after RL", f["greedy"]["text"].strip()))
    return out
