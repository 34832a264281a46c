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
        steps, vals = curve_points(rows, key)
        if not steps:
            continue
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


def curve_points(rows: list[dict], key: str) -> tuple[tuple, tuple]:
    """(steps, values) of one metric, one point per step (the last row logged for it), in step order."""
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
    return tuple(zip(*sorted(by_step.items()))) or ((), ())


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
    eff = efficiency(run_dir)
    if eff:
        md += ["", "## Compute", "", *eff]
    md += ["", f"Stage times (s): {json.dumps(summary['stage_seconds'])}", ""]
    (run_dir / "report.md").write_text("\n".join(md))

    parts = [f"<h1>r1lab report: {html.escape(summary['recipe'])}</h1>", f"<pre>{html.escape(table)}</pre>",
             _img(ba), "<h2>GRPO over steps</h2>", "<div class=grid>" + "".join(map(_img, curve_paths)) + "</div>"]
    if examples:
        parts.append("<h2>Replies to the same held-out problem, before and after RL</h2>")
        parts += [f"<h3>{html.escape(t)}</h3><pre>{html.escape(x)}</pre>" for t, x in examples]
    if eff:
        parts.append("<h2>Compute</h2><pre>" + html.escape("\n".join(eff)) + "</pre>")
    parts.append(f"<p>Stage times (s): {html.escape(json.dumps(summary['stage_seconds']))}</p>")
    return run_dir / "report.md", _write_html(run_dir, parts)


def _img(p: Path) -> str:
    """A PNG inlined into the HTML report."""
    return f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'


def _write_html(run_dir: Path, parts: list[str]) -> Path:
    """report.html: the page's parts in the report's one style sheet."""
    page = ("<!doctype html><meta charset=utf-8><title>r1lab report</title><style>body{font-family:system-ui,"
            "sans-serif;max-width:1100px;margin:2em auto;color:#1b1f24}pre{background:#f4f6f8;padding:1em;"
            "overflow:auto}.grid{display:flex;flex-wrap:wrap;gap:8px}img{max-width:100%}</style>" + "".join(parts))
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.html"


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


def efficiency(run_dir: Path) -> list[str]:
    """Measured training throughput per stage: tokens/s, FLOPs, achieved FLOP/s and its share of this machine's
    measured matmul peak (means over the logged windows)."""
    lines = []
    for stage, prefix in (("pretrain", ""), ("grpo", "train_")):
        rows = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if r.get(prefix + "flops_per_s")]
        if not rows:
            continue
        mean = lambda k: sum(r[prefix + k] for r in rows) / len(rows)  # noqa: E731
        flops = sum(r[prefix + "flops"] for r in rows)
        mfu = [r[prefix + "mfu"] for r in rows if r.get(prefix + "mfu")]
        share = f", {100 * sum(mfu) / len(mfu):.2f}% of the measured matmul peak" if mfu else ""
        lines.append(f"{stage:<9} {mean('tokens_per_s'):,.0f} tokens/s, {flops:.3g} FLOPs in all, "
                     f"{mean('flops_per_s') / 1e9:.2f} GFLOP/s achieved{share}")
    return lines


# ----------------------------------------------------------------------------- multi-stage recipes (r1, distill)


def plot_stages(summary: dict, out_dir: Path) -> Path:
    """pass@1 and greedy accuracy of every stage of a recipe, in order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(summary["stages"].values())
    fig, ax = plt.subplots(figsize=(max(5.2, 1.1 * len(stages)), 3.4), dpi=110)
    x = range(len(stages))
    for off, key, color in ((-0.2, "pass@1", "#1d3f73"), (0.2, "greedy", "#9aa7b8")):
        vals = [100 * (s[key] or 0) for s in stages]
        ax.bar([i + off for i in x], vals, width=0.4, label=key, color=color)
        for i, v in enumerate(vals):
            ax.text(i + off, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(list(x), [s["label"].replace(": ", "\n").replace(" + ", "\n+ ") for s in stages], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"held-out {summary['task']}: {summary['recipe']} recipe, stage by stage", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "stages.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_stage_report(run_dir: str | Path, summary: dict, table: str, rl_runs: dict[str, Path]) -> tuple[Path, Path]:
    """report.md and report.html of a multi-stage recipe: its table (with the distillation-versus-RL verdict when
    there is one), pass@1 per stage, and the curves of each RL stage (`rl_runs`: title -> GRPO run directory)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    bars = plot_stages(summary, plots)
    curves = {title: plot_curves(read_metrics(Path(d) / "metrics.jsonl"), plots / Path(d).name)
              for title, d in rl_runs.items()}
    md = [f"# r1lab report: {summary['recipe']}", "", "```", table, "```", "", f"![stages](plots/{bars.name})", ""]
    if "distill_vs_rl" in summary:
        md += ["## Distillation versus RL on the same student", "", _comparison_text(summary), ""]
    for title, paths in curves.items():
        md += [f"## {title} over steps", ""] + [f"![{p.stem}](plots/{p.parent.name}/{p.name})" for p in paths] + [""]
    md += [f"Stage seconds (wall, CPU): {json.dumps(summary['stage_seconds'])}", ""]
    (run_dir / "report.md").write_text("\n".join(md))

    parts = [f"<h1>r1lab report: {html.escape(summary['recipe'])}</h1>", f"<pre>{html.escape(table)}</pre>", _img(bars)]
    if "distill_vs_rl" in summary:
        parts += ["<h2>Distillation versus RL on the same student</h2>", f"<p>{html.escape(_comparison_text(summary))}</p>"]
    for title, paths in curves.items():
        parts += [f"<h2>{html.escape(title)} over steps</h2>", "<div class=grid>" + "".join(map(_img, paths)) + "</div>"]
    parts.append(f"<p>Stage seconds (wall, CPU): {html.escape(json.dumps(summary['stage_seconds']))}</p>")
    return run_dir / "report.md", _write_html(run_dir, parts)


def _comparison_text(summary: dict) -> str:
    """The paper's Table 6 question in miniature, answered with this run's numbers."""
    from r1lab.recipes_r1 import verdict

    c = summary["distill_vs_rl"]
    return (f"The same pretrained student was either fine-tuned on the RL teacher's filtered samples "
            f"({c['distill_seconds']:.0f} s) or trained with GRPO directly for about the same time "
            f"({c['rl_seconds']:.0f} s, {c['rl_steps']} steps). pass@1: distillation {100 * c['distill_pass@1']:.1f}%, "
            f"GRPO {100 * c['rl_pass@1']:.1f}%; {verdict(c)}. In the paper distilling DeepSeek-R1 into Qwen-32B reached "
            f"72.6% on AIME 2024 against 47.0% for RL on the same model.")
