"""A recipe's report: renders the summary it is handed (and the metrics and evaluations in its directory) as a
table, plots (PNG), report.md (plots linked) and report.html (plots inlined). It knows no recipe's code."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from r1lab.train.run import read_metrics

CURVES = [  # (metric key in a GRPO run's metrics.jsonl, title, percent axis)
    ("reward_mean", "reward (mean per step)", False),
    ("accuracy", "accuracy of the sampled replies", True),
    ("mean_length", "mean reply length (tokens)", False),
    ("think_share", "share of replies that think", True),
    ("tool_share", "share of replies that call the tool", True),
    ("tool_calls_per_reply", "tool calls per reply", False),
    ("tool_errors", "tool calls that failed (per step)", False),
    ("tool_seconds", "seconds of programs run (per step)", False),
    ("teacher_reverse_kl", "reverse KL to the teacher per token", False),
    ("kl", "KL to the reference policy", False),
    ("entropy", "policy entropy per token", False),
]
ARM_NAMES = {"distilled": "SFT distillation", "onpolicy": "on-policy distillation", "student_rl": "GRPO"}


# ----------------------------------------------------------------------------- tables


def render(summary: dict) -> str:
    """The summary's table as text: before/after for r1zero, stage by stage for the other recipes."""
    return _render_r1zero(summary) if summary["recipe"] == "r1zero" else _render_stages(summary)


def _render_r1zero(summary: dict) -> str:
    b, f = summary["base"], summary["final"]

    def row(name, key, pct=True):
        fmt = (lambda x: f"{100 * x:6.1f}%") if pct else (lambda x: f"{x:7.1f}")
        delta = f[key] - b[key]
        d = f"{100 * delta:+6.1f} pts" if pct else f"{delta:+7.1f}"
        return f"  {name:<25}{fmt(b[key])}   {fmt(f[key])}   {d}"

    return "\n".join(
        [
            f"R1-Zero in miniature ({summary['task']}, held-out problems)",
            f"  {'':<25}{'base':>7}   {'after RL':>7}   change",
            row("pass@1 (k samples)", "pass@1"),
            row("greedy accuracy", "greedy"),
            row("cons@k", "cons@k"),
            row("replies that think", "think_share"),
            *([row("replies that call a tool", "tool_share")] if b.get("tool_share") or f.get("tool_share") else []),
            row("mean reply tokens", "mean_length", pct=False),
            f"  wall time {summary['wall_seconds']:.0f} s",
        ]
    )


def _render_stages(summary: dict) -> str:
    e = summary["eval"]
    title = {"r1": "The R1 recipe in miniature", "distill": "Distillation vs RL on a small dense student"}
    lines = [
        f"{title.get(summary['recipe'], summary['recipe'])} ({summary['task']}, {e['problems']} held-out "
        f"problems, k={e['k']})"
    ]
    if "student" in summary:
        t, s = summary["teacher"], summary["student"]
        lines.append(
            f"  teacher {t['params_total']:,} parameters ({t['params_active']:,} active); student "
            f"{s['params_total']:,} (dense, pretrained {s['pretrain_steps']} steps "
            "on the base model's corpus)"
        )
    lines.append(f"  {'':<34}{'pass@1':>8}{'greedy':>8}{'cons@k':>8}{'thinks':>8}{'tokens':>8}{'seconds':>9}")
    pct = lambda x: f"{100 * x:7.1f}%" if x is not None else f"{'-':>8}"  # noqa: E731
    for v in summary["stages"].values():
        sec = f"{v['seconds']:9.0f}" if v.get("seconds") is not None else f"{'':>9}"
        lines.append(
            f"  {v['label']:<34}{pct(v['pass@1'])}{pct(v['greedy'])}{pct(v['cons@k'])}"
            f"{pct(v['think_share'])}{v['mean_length'] or 0:8.1f}{sec}"
        )
    for name, d in summary.get("data", {}).items():
        rejected = ", ".join(f"{k} {v}" for k, v in d["rejected"].items()) or "none"
        lines.append(
            f"  {name} data: {d['problems']} problems x {d['k']} samples -> {d['passed']} passed the "
            f"filters, {d['kept']} kept (mean reasoning {d['mean_reasoning_chars']:.0f} chars); rejected "
            f"{rejected}"
        )
    for name, a in summary.get("arms", {}).items():
        steps = f", {a['steps']} steps" if a.get("steps") else ""
        lines.append(
            f"  {ARM_NAMES.get(name, name)}: {a['wall_seconds']:.0f} s wall ({a['cpu_seconds']:.0f} s CPU"
            f"{steps}); the teacher's own training is not counted"
        )
    lines += [f"  {verdict(c)}" for c in summary.get("comparisons", [])]
    after = " (after the r1zero stages)" if summary["recipe"] != "r1zero" else ""
    lines.append(f"  wall time {summary['wall_seconds']:.0f} s{after}")
    return "\n".join(lines)


def verdict(c: dict) -> str:
    """One paired comparison in words: the difference, its 95% interval, and which arm is ahead."""
    first, second = ARM_NAMES.get(c["first"], c["first"]), ARM_NAMES.get(c["second"], c["second"])
    ci = f" ± {100 * c['interval95']:.1f}" if c["interval95"] is not None else ""
    head = (
        f"{first} minus {second}: {100 * c['difference']:+.1f}{ci} pts pass@1 (95% interval, paired over "
        f"{c['problems']} problems)"
    )
    if c["winner"] == "neither":
        return head + ": no clear difference at this size and budget"
    return head + f": {first if c['winner'] == 'first' else second} is ahead"


# ----------------------------------------------------------------------------- plots


def curve_points(rows: list[dict], key: str) -> tuple[tuple, tuple]:
    """(steps, values) of one metric, one point per step (the last row logged for it), in step order."""
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
    points = sorted(by_step.items())
    return tuple(s for s, _ in points), tuple(v for _, v in points)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per GRPO metric present, with a moving average when there are enough steps."""
    plt = _pyplot()
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
            smooth = [
                sum(vals[max(0, i - w + 1) : i + 1]) / len(vals[max(0, i - w + 1) : i + 1]) for i in range(len(vals))
            ]
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


def plot_bars(
    groups: list[tuple[str, dict]],
    keys: list[tuple[str, str]],
    title: str,
    path: Path,
    colors=("#9aa7b8", "#1d3f73", "#3b6fb6", "#6f8fbf"),
) -> Path:
    """Grouped bars: one group per (label, headline), one bar per (key, name), in percent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.2, 1.1 * len(keys) * len(groups) / 2), 3.4), dpi=110)
    width = 0.8 / len(groups)
    for g, (label, h) in enumerate(groups):
        xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(keys))]
        vals = [100 * (h[k] or 0) for k, _ in keys]
        ax.bar(xs, vals, width=width, label=label, color=colors[g % len(colors)])
        for x, v in zip(xs, vals):
            ax.text(x, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(list(range(len(keys))), [name for _, name in keys], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report


def write_report(run_dir: str | Path, summary: dict, rl_runs: dict[str, Path]) -> tuple[Path, Path]:
    """report.md and report.html: the table, bars of the evaluations, the curves of each RL run (`rl_runs`: title
    -> GRPO run directory), the replies before and after (r1zero) and the compute each training stage used."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    table = render(summary)
    if summary["recipe"] == "r1zero":
        tools = (
            [("tool_share", "calls a tool")]
            if summary["base"].get("tool_share") or summary["final"].get("tool_share")
            else []
        )
        bars = plot_bars(
            [("base model", summary["base"]), ("after GRPO", summary["final"])],
            [("pass@1", "pass@1"), ("greedy", "greedy"), ("cons@k", "cons@k"), ("think_share", "thinks")] + tools,
            f"held-out {summary['task']}: before and after RL",
            plots / "before_after.png",
        )
    else:
        stages = list(summary["stages"].values())
        bars = _plot_stages(stages, summary, plots / "stages.png")
    curves = {
        title: plot_curves(read_metrics(Path(d) / "metrics.jsonl"), plots / Path(d).name)
        for title, d in rl_runs.items()
    }
    examples = _examples(run_dir) if summary["recipe"] == "r1zero" else []
    comparisons = [verdict(c) for c in summary.get("comparisons", [])]
    compute = efficiency(run_dir)
    times = json.dumps(summary["stage_seconds"])

    md = [f"# r1lab report: {summary['recipe']}", "", "```", table, "```", "", f"![{bars.stem}](plots/{bars.name})", ""]
    if comparisons:
        md += ["## The arms compared on the same problems", ""] + [f"- {c}" for c in comparisons] + [""]
    for title, paths in curves.items():
        md += [f"## {title} over steps", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in paths] + [""]
    if examples:
        md += ["## Replies to the same held-out problem, before and after RL", ""]
        for title, text in examples:
            md += [f"**{title}**", "", "```", text, "```", ""]
    if compute:
        md += ["## Compute", "", *compute, ""]
    md += [f"Stage seconds (wall, CPU): {times}", ""]
    (run_dir / "report.md").write_text("\n".join(md))

    parts = [f"<h1>r1lab report: {html.escape(summary['recipe'])}</h1>", f"<pre>{html.escape(table)}</pre>", _img(bars)]
    if comparisons:
        parts += [
            "<h2>The arms compared on the same problems</h2>",
            "<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in comparisons) + "</ul>",
        ]
    for title, paths in curves.items():
        parts += [
            f"<h2>{html.escape(title)} over steps</h2>",
            "<div class=grid>" + "".join(map(_img, paths)) + "</div>",
        ]
    if examples:
        parts.append("<h2>Replies to the same held-out problem, before and after RL</h2>")
        parts += [f"<h3>{html.escape(t)}</h3><pre>{html.escape(x)}</pre>" for t, x in examples]
    if compute:
        parts.append("<h2>Compute</h2><pre>" + html.escape("\n".join(compute)) + "</pre>")
    parts.append(f"<p>Stage seconds (wall, CPU): {html.escape(times)}</p>")
    page = (
        "<!doctype html><meta charset=utf-8><title>r1lab report</title><style>body{font-family:system-ui,"
        "sans-serif;max-width:1100px;margin:2em auto;color:#1b1f24}pre{background:#f4f6f8;padding:1em;"
        "overflow:auto}.grid{display:flex;flex-wrap:wrap;gap:8px}img{max-width:100%}</style>" + "".join(parts)
    )
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.md", run_dir / "report.html"


def _plot_stages(stages: list[dict], summary: dict, path: Path) -> Path:
    """pass@1 and greedy accuracy of every stage of a recipe, in order."""
    plt = _pyplot()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _img(p: Path) -> str:
    """A PNG inlined into the HTML report."""
    return f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'


def _examples(run_dir: Path, n: int = 2) -> list[tuple[str, str]]:
    """Greedy replies of the base and RL models to the same held-out problems: the first ones that RL changed from
    wrong to right (what the run learned), then the first ones of the list."""
    try:
        base = json.loads((run_dir / "eval_base.json").read_text())["records"]
        final = json.loads((run_dir / "eval_final.json").read_text())["records"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return []
    pairs = [(b, f) for b, f in zip(base, final) if not b.get("skipped") and b.get("greedy") and f.get("greedy")]
    learned = [(b, f) for b, f in pairs if not b["greedy"]["correct"] and f["greedy"]["correct"]]
    out = []
    for b, f in (learned + [p for p in pairs if p not in learned])[:n]:
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
        mean = lambda k, rows=rows, prefix=prefix: sum(r[prefix + k] for r in rows) / len(rows)  # noqa: E731
        flops = sum(r[prefix + "flops"] for r in rows)
        mfu = [r[prefix + "mfu"] for r in rows if r.get(prefix + "mfu")]
        share = f", {100 * sum(mfu) / len(mfu):.2f}% of the measured matmul peak" if mfu else ""
        lines.append(
            f"{stage:<9} {mean('tokens_per_s'):,.0f} tokens/s, {flops:.3g} FLOPs in all, "
            f"{mean('flops_per_s') / 1e9:.2f} GFLOP/s achieved{share}"
        )
    return lines
