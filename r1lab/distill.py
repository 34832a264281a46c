"""Distillation as in DeepSeek-R1: a teacher samples k completions per problem, rejection sampling keeps the
readable correct ones, and a student is fine-tuned on them (SFT, no RL).

The teacher is a local model sampled with the shared sampler (`teacher`), or any OpenAI-compatible endpoint that
returns `reasoning_content` (`teacher_url`: DeepSeek's API, vLLM, `r1lab serve`), asked through `r1lab.client`
with retries and a disk cache, so a rerun after a crash re-sends only the requests that were never answered. A
served reply comes back as `<think>\n{reasoning_content}\n</think>\n\n{content}` and is then judged and written
exactly as a local teacher's text with the same think block inline.

A sample is kept when it finished within `max_new_tokens`, is well-formed (one closed think block, then a
non-empty answer), is judged correct by the task's verifier, keeps to one language in its reasoning, fits the
length cap, and is not an exact duplicate of a kept sample for the same problem. The first test a sample fails is
its rejection reason; the kept set is written as chat JSONL with the counts beside it.

    <out>/data.jsonl          {"messages": [user, assistant "<think>\n...\n</think>\n\nanswer"], "id", "task"}
    <out>/data_stats.json     candidates, kept, rejected by reason; a served teacher's tokens and cost
    <out>/teacher_cache/      one JSON file per answered request to a served teacher (see r1lab.client)
    <out>/sft/                the student's SFT run; <out>/sft/model is the distilled student
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from r1lab.client import Reply
from r1lab.config import opt
from r1lab.eval import user_turn
from r1lab.reasoning import THINK_END, THINK_START, split_reasoning
from r1lab.rewards import LANGUAGE_SCRIPTS, accuracy, language_consistency
from r1lab.tasks import Problem, get_task
from r1lab.tokenizer import TEMPLATES
from r1lab.train.grpo import GRPOConfig
from r1lab.train.sft import SFTConfig

REASONS = ("truncated", "malformed", "incorrect", "unjudged", "language", "too_long", "duplicate", "over_limit")


@dataclass
class DistillConfig:
    out: str = opt("runs/distill", "run directory: data.jsonl, data_stats.json, teacher_cache/, sft/")
    teacher: str = opt("", "teacher model directory (native r1lab or any transformers causal LM), sampled here")
    teacher_url: str = opt(
        "",
        "or a served teacher: an OpenAI-compatible endpoint that returns reasoning_content "
        "(https://api.deepseek.com, vLLM with its reasoning parser, r1lab serve at "
        "http://HOST:PORT/v1)",
    )
    teacher_model: str = opt("", "the model name at --teacher-url (e.g. deepseek-reasoner)")
    api_key: str = opt("", "bearer token for --teacher-url (default $OPENAI_API_KEY); never written to config.yaml")
    concurrency: int = opt(8, "requests to --teacher-url in flight at once")
    request_timeout: float = opt(
        600.0, "seconds a request to --teacher-url may wait for its answer before it is retried"
    )
    max_retries: int = opt(
        6,
        "retries of one request on 429, 5xx, timeouts, lost connections and malformed "
        "replies; then the run stops (its answered requests are cached)",
    )
    retry_wait: float = opt(
        1.0,
        "first wait before a retry in seconds, doubled each time (jittered, at most 60 s) "
        "unless the server's Retry-After says how long",
    )
    price_per_mtok: list[float] = opt(
        factory=list,
        help="teacher price in $ per million tokens, to report the "
        "cost: one price for all tokens, or input,output "
        "(e.g. 0.55,2.19)",
    )
    student: str = opt("", "student model directory to fine-tune")
    tasks: list[str] = opt(factory=lambda: ["arithmetic"], help="tasks to draw problems from")
    task_args: dict[str, dict] = opt(
        factory=dict, help='knobs per task as JSON, e.g. \'{"arithmetic": {"max_digits": 2}}\''
    )
    split: str = opt("train", "the split problems are drawn from")
    problems: int = opt(200, "problems per task, a seeded sample of the split")
    k: int = opt(4, "teacher samples per problem")
    temperature: float = opt(0.6, "teacher sampling temperature (R1's setting)")
    top_p: float = opt(0.95, "teacher nucleus sampling (R1's setting)")
    max_new_tokens: int = opt(512, "most tokens per teacher reply; a reply cut there is rejected as truncated")
    teacher_template: str = opt(
        "r1",
        "the teacher's format: how a local teacher is prompted (r1, r1zero or model); "
        "a served r1zero teacher's content is its answer (r1lab serve takes the "
        "<answer> tags off), given the tags back",
    )
    language: str = opt("en", "the reasoning must be written in this language's script ...")
    language_threshold: float = opt(0.95, "... for at least this share of its words")
    max_length: int = opt(0, "reject replies longer than this many tokens (0: only max_new_tokens)")
    max_per_problem: int = opt(0, "keep at most this many samples per problem (0: all that pass)")
    seed: int = opt(0, "seed of the problems drawn and of the teacher's samples")
    method: str = opt(
        "sft",
        "sft: rejection sampling, then SFT of the student on the teacher's samples; on-policy: "
        "the student samples and the teacher scores every sampled token (per-token reverse "
        "KL as the advantage, --onpolicy.* settings; a local --teacher with the student's "
        "tokenizer)",
    )
    sft: SFTConfig = opt(factory=SFTConfig, help="")
    onpolicy: GRPOConfig = opt(factory=lambda: GRPOConfig(rewards=[], reward_weights=[], template="r1"), help="")

    def validate(self) -> DistillConfig:
        if self.method not in ("sft", "on-policy"):
            raise ValueError(f"method must be sft or on-policy (got {self.method!r})")
        if self.method == "on-policy":
            if self.teacher_url:
                raise ValueError(
                    "--method on-policy scores the student's own tokens with the teacher, which an "
                    "OpenAI-compatible endpoint cannot do: give a local --teacher model directory, or "
                    "use --method sft with --teacher-url"
                )
            if not self.teacher or not self.student:
                raise ValueError("--teacher and --student are required: the model directories to distil from and into")
            self.student_onpolicy().validate()
            return self
        if not (self.teacher or self.teacher_url) or not self.student:
            raise ValueError(
                "--teacher (or --teacher-url) and --student are required: the models to distil from and into"
            )
        if self.teacher and self.teacher_url:
            raise ValueError(
                f"--teacher {self.teacher!r} and --teacher-url {self.teacher_url!r} are two teachers; give one"
            )
        if self.teacher_url:
            self._validate_served()
        if self.teacher_template != "model" and self.teacher_template not in TEMPLATES:
            raise ValueError(
                f"unknown teacher_template {self.teacher_template!r}; choose model, {', '.join(TEMPLATES)}"
            )
        if self.language not in LANGUAGE_SCRIPTS:
            raise ValueError(f"unknown language {self.language!r}; choose one of {', '.join(LANGUAGE_SCRIPTS)}")
        if not 0 <= self.language_threshold <= 1:
            raise ValueError(f"language_threshold must be in [0, 1] (got {self.language_threshold})")
        for name in ("problems", "k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_length < 0 or self.max_per_problem < 0:
            raise ValueError(
                f"max_length and max_per_problem must be >= 0 (got {self.max_length}, {self.max_per_problem})"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        for t in self.tasks:
            get_task(t, **self.task_args.get(t, {}))
        self.student_sft("data.jsonl").validate(files=False)  # the student's settings, before any sampling
        return self

    def _validate_served(self) -> None:
        if not self.teacher_url.startswith(("http://", "https://")):
            raise ValueError(f"--teacher-url must start with http:// or https:// (got {self.teacher_url!r})")
        if not self.teacher_model:
            raise ValueError(
                f"--teacher-model is required with --teacher-url: the model name served at "
                f"{self.teacher_url} (GET {self.teacher_url.rstrip('/')}/models lists them)"
            )
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError(
                f"--concurrency must be >= 1 and --max-retries >= 0 (got {self.concurrency}, {self.max_retries})"
            )
        if not self.request_timeout > 0 or self.retry_wait < 0:
            raise ValueError(
                f"--request-timeout must be > 0 and --retry-wait >= 0 (got {self.request_timeout}, {self.retry_wait})"
            )
        if len(self.price_per_mtok) > 2 or any(p < 0 for p in self.price_per_mtok):
            raise ValueError(f"--price-per-mtok takes one price or input,output, each >= 0 (got {self.price_per_mtok})")

    def student_onpolicy(self) -> GRPOConfig:
        """The student's on-policy distillation: `onpolicy` with its run under `out/onpolicy`, the teacher, the
        tasks (their train prompts) and the seed set here."""
        from r1lab import config as C

        return C.merge(
            self.onpolicy,
            {
                "out": str(Path(self.out) / "onpolicy"),
                "model": self.student,
                "teacher": self.teacher,
                "tasks": self.tasks,
                "task_args": self.task_args,
                "seed": self.seed,
                "template": self.teacher_template if self.teacher_template != "model" else self.onpolicy.template,
            },
        )

    def student_sft(self, data: str | Path) -> SFTConfig:
        """The student's SFT settings: `sft` with its run under `out/sft`, on `data`."""
        from r1lab import config as C

        return C.merge(self.sft, {"out": str(Path(self.out) / "sft"), "model": self.student, "data": str(data)})


# ----------------------------------------------------------------------------- rejection sampling


def well_formed(text: str) -> bool:
    """R1's output format: reasoning closed by one `</think>` (opened by `<think>` or by the prompt, only whitespace
    before it), then a non-empty answer with no reasoning tags in it."""
    if text.count(THINK_END) != 1 or text.count(THINK_START) > 1:
        return False
    if THINK_START in text and (text.index(THINK_START) > text.index(THINK_END) or text.split(THINK_START)[0].strip()):
        return False
    _, answer = split_reasoning(text)
    return bool(answer.strip())


def r1_message(text: str) -> str:
    """A well-formed completion in R1's format, `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`; the answer stays
    as the teacher wrote it (\\boxed{} or <answer> tags), which is what the verifier reads."""
    reasoning, answer = split_reasoning(text)
    return f"{THINK_START}\n{reasoning or ''}\n{THINK_END}\n\n{answer}"


def filter_samples(
    samples: Sequence[Sequence],
    problems: Sequence[Problem],
    *,
    language: str = "en",
    language_threshold: float = 0.95,
    max_length: int = 0,
    max_per_problem: int = 0,
) -> tuple[list[dict], dict]:
    """Rejection sampling. samples[i] are the teacher's completions for problems[i] (objects with `text`,
    `token_ids` and `finish_reason`, like the sampler's). Returns (kept chat records, counts): each rejected
    sample is counted under the first test it fails, in the order of REASONS."""
    if len(samples) != len(problems):
        raise ValueError(f"{len(samples)} groups of samples for {len(problems)} problems; give one group per problem")
    rejected = Counter({r: 0 for r in REASONS})
    kept, candidates, with_kept = [], 0, 0
    for group, p in zip(samples, problems):
        seen, n_kept = set(), 0
        for s in group:
            candidates += 1
            reason = _rejection(s, p, language, language_threshold, max_length)
            message = r1_message(s.text) if reason is None else None
            if reason is None and message in seen:
                reason = "duplicate"
            if reason is None and max_per_problem and n_kept >= max_per_problem:
                reason = "over_limit"
            if reason is not None:
                rejected[reason] += 1
                continue
            seen.add(message)
            n_kept += 1
            kept.append(
                {
                    "messages": [{"role": "user", "content": user_turn(p)}, {"role": "assistant", "content": message}],
                    "id": p.id,
                    "task": p.task,
                }
            )
        with_kept += n_kept > 0
    counts = {
        "problems": len(problems),
        "candidates": candidates,
        "kept": len(kept),
        "problems_with_kept": with_kept,
        "rejected": dict(rejected),
    }
    return kept, counts


def _rejection(s, p: Problem, language: str, threshold: float, max_length: int) -> str | None:
    if s.finish_reason == "length":
        return "truncated"
    if not well_formed(s.text):
        return "malformed"
    verdict = accuracy([s.text], answer=[p.answer], task=[p.task], meta=[p.meta])[0]
    if verdict is None:
        return "unjudged"
    if verdict < 1:
        return "incorrect"
    share = language_consistency([s.text], language=language)[0]
    if share is not None and share < threshold:  # None: no words to judge (e.g. only digits and symbols)
        return "language"
    if max_length and _length(s) > max_length:
        return "too_long"
    return None


def _length(s) -> int:
    """Tokens of a reply: the sampler's token ids, or what a served teacher reported in its usage."""
    return len(s.token_ids) if hasattr(s, "token_ids") else s.completion_tokens


# ----------------------------------------------------------------------------- the pipeline


def load_problems(cfg: DistillConfig) -> list[Problem]:
    """`problems` per task from `split` (a seeded sample; a benchmark's in file order)."""
    return [
        p
        for name in cfg.tasks
        for p in get_task(name, **cfg.task_args.get(name, {})).problems(cfg.split, n=cfg.problems, seed=cfg.seed)
    ]


def sample_teacher(cfg: DistillConfig, problems: list[Problem], progress: bool = True) -> list[list]:
    """k completions per problem from the teacher, through the shared sampler."""
    from r1lab.model.load import load_model_and_tokenizer
    from r1lab.runtime import pick_device
    from r1lab.sampler import Sampler, SamplingParams
    from r1lab.tokenizer import render_prompt

    model, tok = load_model_and_tokenizer(cfg.teacher, device=pick_device(cfg.sft.device))
    prompts = [render_prompt(tok, user_turn(p), cfg.teacher_template) for p in problems]
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.k, seed=cfg.seed
    )
    sampler = Sampler(model, tok)
    chunk = max(1, sampler.max_batch // cfg.k)  # prompts per call: a full batch of rows, and a progress tick
    starts = range(0, len(prompts), chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"teacher ({chunk * cfg.k} samples per tick)", dynamic_ncols=True)
    groups = []
    for i in starts:
        params.seed = cfg.seed * 1_000_003 + i
        outs = sampler.generate(prompts[i : i + chunk], params)
        groups += [outs[j * cfg.k : (j + 1) * cfg.k] for j in range(len(outs) // cfg.k)]
    return groups


def teacher_client(cfg: DistillConfig):
    """The served teacher's client, caching every answered request under `out/teacher_cache`."""
    from r1lab.client import ChatClient

    return ChatClient(
        cfg.teacher_url,
        cfg.teacher_model,
        cfg.api_key or os.environ.get("OPENAI_API_KEY"),
        concurrency=cfg.concurrency,
        timeout=cfg.request_timeout,
        max_retries=cfg.max_retries,
        retry_wait=cfg.retry_wait,
        cache_dir=Path(cfg.out) / "teacher_cache",
    )


def sample_served(cfg: DistillConfig, problems: list[Problem], progress: bool = True) -> tuple[list[list], dict]:
    """k replies per problem from the teacher at `teacher_url`, one request each, and the tokens used. Sample j of
    problem i has seed (seed * 1_000_003 + i) * 65_536 + j, whatever k is, so raising k re-sends none of the answered
    requests. Replies come back as text with the thinking inline, filtered and written exactly as a local teacher's."""
    client = teacher_client(cfg)
    bodies, tags = [], []
    for i, p in enumerate(problems):
        for j in range(cfg.k):
            bodies.append(
                client.body(
                    user_turn(p),
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_new_tokens,
                    seed=(cfg.seed * 1_000_003 + i) * 65_536 + j,
                )
            )
            tags.append([p.task, p.id, j])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(bodies), desc=f"teacher {cfg.teacher_model}", dynamic_ncols=True)
    try:
        replies = client.complete(bodies, tags, on_reply=(lambda _: bar.update()) if bar else None)
    finally:
        if bar:
            bar.close()
    if cfg.teacher_template == "r1zero":
        replies = [as_r1zero(r) for r in replies]
    return [replies[i * cfg.k : (i + 1) * cfg.k] for i in range(len(problems))], client.usage(cfg.price_per_mtok)


def as_r1zero(reply):
    """A served R1-Zero reply as the model wrote it: the server split the thinking into reasoning_content and took
    the answer out of its <answer> tags (so that chat clients see the answer alone); distillation judges and
    teaches the format itself, ` <think> ... </think> <answer> ... </answer>`."""
    import dataclasses

    if reply.reasoning is None or "<answer>" in reply.content:
        return reply
    return _R1ZeroReply(**{f.name: getattr(reply, f.name) for f in dataclasses.fields(reply)})


class _R1ZeroReply(Reply):
    @property
    def text(self) -> str:
        return f" {THINK_START} {self.reasoning} {THINK_END} <answer> {self.content} </answer>"


def usage_line(usage: dict) -> str:
    """The served teacher's tokens in one line: paid by this run, and cached from an earlier one."""

    def part(u):
        tokens = f"{u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion tokens"
        if u["reasoning_tokens"]:
            tokens += f" ({u['reasoning_tokens']:,} reasoning)"
        return tokens + (f", ${u['cost']:.4f}" if u["cost"] is not None else "")

    a, c = usage["answered"], usage["cached"]
    line = f"teacher {usage['model']}: {a['requests']} requests answered ({part(a)})"
    if c["requests"]:
        line += f"; {c['requests']} cached, not re-paid ({part(c)})"
    retried = ", ".join(f"{n} x {cause}" for cause, n in usage["retried"].items())
    return line + (f"; retried {retried}" if retried else "")


def write_dataset(kept: list[dict], counts: dict, out: Path) -> tuple[Path, Path]:
    """data.jsonl and data_stats.json, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    data, stats = out / "data.jsonl", out / "data_stats.json"
    for path, text in (
        (data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)),
        (stats, json.dumps(counts, indent=2) + "\n"),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return data, stats


def sampling_settings(cfg: DistillConfig) -> dict:
    """What decides the dataset: a re-run reuses it only when these are unchanged."""
    teacher = ("teacher_url", "teacher_model") if cfg.teacher_url else ("teacher", "teacher_template")
    names = teacher + (
        "tasks",
        "task_args",
        "split",
        "problems",
        "k",
        "temperature",
        "top_p",
        "max_new_tokens",
        "language",
        "language_threshold",
        "max_length",
        "max_per_problem",
        "seed",
    )
    return json.loads(json.dumps({n: getattr(cfg, n) for n in names}))


def distill(cfg: DistillConfig, resume: bool = True, progress: bool = True):
    """Sample, filter, write the dataset, then fine-tune the student; returns (student, tokenizer, sft run, counts).
    Re-running with the same `out` reuses the written dataset and resumes the student's training."""
    from r1lab import config as C
    from r1lab.train.sft import sft

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    C.save(C.merge(cfg, {"api_key": ""}), out / "config.yaml")  # the key stays out of the run directory
    if cfg.method == "on-policy":
        from r1lab.train.grpo import grpo

        model, tok, run = grpo(cfg.student_onpolicy(), resume=resume, progress=progress)
        return model, tok, run, None
    data, stats = out / "data.jsonl", out / "data_stats.json"
    settings = sampling_settings(cfg)
    if resume and data.is_file() and stats.is_file():
        counts = json.loads(stats.read_text())
        if counts.get("settings") != settings:
            changed = sorted(k for k in settings if counts.get("settings", {}).get(k) != settings[k])
            raise ValueError(
                f"{data} was sampled with other settings ({', '.join(changed)} differ); use --fresh to "
                f"sample again, or another --out"
            )
    else:
        problems = load_problems(cfg)
        usage = None
        if cfg.teacher_url:
            samples, usage = sample_served(cfg, problems, progress)
        else:
            samples = sample_teacher(cfg, problems, progress)
        kept, counts = filter_samples(
            samples,
            problems,
            language=cfg.language,
            language_threshold=cfg.language_threshold,
            max_length=cfg.max_length,
            max_per_problem=cfg.max_per_problem,
        )
        counts["settings"] = settings
        if usage is not None:
            counts["teacher_usage"] = usage
        write_dataset(kept, counts, out)
    if not counts["kept"]:
        raise ValueError(
            f"no teacher sample passed the filters ({counts['candidates']} candidates, rejected: "
            f"{ {k: v for k, v in counts['rejected'].items() if v} }); raise k or max_new_tokens, or "
            f"check teacher_template (see {stats})"
        )
    model, tok, run = sft(cfg.student_sft(data), resume=resume, progress=progress)
    return model, tok, run, counts
