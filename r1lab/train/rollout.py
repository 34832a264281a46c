"""GRPO's rollouts: draw a step's prompts, render them with the template, sample G completions each with the shared
sampler (or vLLM), score them with the reward functions, and gather what the step's metrics need across processes.

Under torchrun every process draws the same prompts and samples a contiguous share of them, whole groups only, each
prompt from its own seed: N processes sample exactly the completions one process would, and every group's rewards
are scored where the group was sampled. Only the counts dynamic sampling needs cross processes.

With a tool (GRPOConfig.tools), completions carry which tokens the model wrote (`token_mask`) and their tool calls:
the loss and the length metrics count the model's tokens only, and `tool_metrics` sums up the calls.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from r1lab.sampler import Completion, SamplingParams
from r1lab.tasks import Problem
from r1lab.tokenizer import render_prompt
from r1lab.train import dist
from r1lab.train.advantages import zero_variance_groups


@dataclass
class Rollout:
    problems: list[Problem]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]  # [P][G]
    rewards: torch.Tensor  # [P, G], NaN where no reward could judge
    parts: dict[str, torch.Tensor]  # per reward function [P, G]
    correct: torch.Tensor  # [P, G] accuracy (NaN where not judged)
    zero_variance_share: float = 0.0
    rounds: int = 1

    @property
    def flat(self) -> list[Completion]:
        return [c for group in self.completions for c in group]


def score(completions: list[list[Completion]], problems: list[Problem], fns, weights, accuracy_fn):
    """Weighted sum of reward functions (None -> NaN, skipped in the sum like TRL; all None -> NaN)."""
    flat = [c for g in completions for c in g]
    G = len(completions[0])
    cols = dict(
        completions=[c.text for c in flat],
        answer=[p.answer for p in problems for _ in range(G)],
        task=[p.task for p in problems for _ in range(G)],
        prompts=[p.prompt for p in problems for _ in range(G)],
        meta=[p.meta for p in problems for _ in range(G)],
        completion_ids=[c.token_ids for c in flat],
    )
    parts = {}
    total = torch.zeros(len(flat), dtype=torch.float64)
    judged = torch.zeros(len(flat), dtype=torch.bool)
    for spec, fn, w in zip(fns.keys(), fns.values(), weights):
        vals = fn(**cols)
        if len(vals) != len(flat):
            raise ValueError(f"reward {spec!r} returned {len(vals)} values for {len(flat)} completions")
        r = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64)
        parts[spec] = r.view(-1, G)
        ok = ~torch.isnan(r)
        total += torch.where(ok, w * r, torch.zeros_like(r))
        judged |= ok
    total[~judged] = math.nan
    acc = torch.tensor([math.nan if v is None else float(v) for v in accuracy_fn(**cols)], dtype=torch.float64)
    return total.view(-1, G), parts, acc.view(-1, G)


class Rollouts:
    """A trainer's source of scored groups: its tasks, template, sampler and reward functions."""

    def __init__(self, cfg, sampler, tokenizer, tasks, reward_fns: dict, accuracy_fn):
        self.cfg, self.sampler, self.tok, self.tasks = cfg, sampler, tokenizer, tasks
        self.reward_fns, self.accuracy_fn = reward_fns, accuracy_fn

    def draw(self, step: int, round_: int, n: int) -> list[Problem]:
        """The step's prompts: a function of (seed, step, resampling round) only."""
        rng = random.Random((self.cfg.seed * 1_000_003 + step) * 31 + round_)
        task = self.tasks[rng.randrange(len(self.tasks))]
        return task.problems("train", n=n, seed=rng.randrange(1 << 30))

    def collect(self, step: int) -> Rollout:
        """This step's scored groups. Every process draws the same prompts and samples its share, whole groups, each
        prompt seeded by (seed, step, round, its place in the draw); only the kept and zero-variance counts that
        dynamic sampling needs are summed over processes."""
        cfg = self.cfg
        keep_p, keep_ids, keep_c, keep_r, keep_parts, keep_acc = [], [], [], [], [], []
        kept = zero_var_total = groups_total = 0
        rounds = 0
        while kept < cfg.prompts_per_step and rounds <= (cfg.max_resample_rounds if cfg.dynamic_sampling else 0):
            need = cfg.prompts_per_step - kept
            drawn = self.draw(step, rounds, need)
            mine = dist.share(len(drawn))
            problems = drawn[mine]
            seed = (cfg.seed * 1_000_003 + step) * 31 + rounds
            zero_round = kept_round = 0
            if problems:
                prompts = [render_prompt(self.tok, p.prompt, cfg.template) for p in problems]
                ids = [self.sampler.encode(p) for p in prompts]
                params = SamplingParams(
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    n=cfg.num_generations,
                    seed=seed,
                )
                seeds = [(seed * 1_000_003 + i) % (1 << 63) for i in range(mine.start, mine.stop)]
                outs = self.sampler.generate(ids, params, seeds=seeds)
                groups = [outs[i * cfg.num_generations : (i + 1) * cfg.num_generations] for i in range(len(problems))]
                rewards, parts, acc = score(groups, problems, self.reward_fns, cfg.reward_weights, self.accuracy_fn)
                zero = zero_variance_groups(rewards)
                zero_round = int(zero.sum())
                for i in range(len(problems)):
                    if cfg.dynamic_sampling and zero[i]:
                        continue
                    keep_p.append(problems[i])
                    keep_ids.append(ids[i])
                    keep_c.append(groups[i])
                    keep_r.append(rewards[i])
                    keep_acc.append(acc[i])
                    keep_parts.append({k: v[i] for k, v in parts.items()})
                    kept_round += 1
            zero_round, kept_round = dist.all_sum([zero_round, kept_round])
            zero_var_total += int(zero_round)
            groups_total += len(drawn)
            kept += int(kept_round)
            rounds += 1
        share = zero_var_total / max(1, groups_total)
        if not keep_p:  # every group had equal rewards in every round: nothing to learn from this step
            empty = torch.zeros(0, cfg.num_generations)
            return Rollout([], [], [], empty, {}, empty.clone(), share, rounds)
        return Rollout(
            keep_p,
            keep_ids,
            keep_c,
            torch.stack(keep_r),
            {k: torch.stack([d[k] for d in keep_parts]) for k in keep_parts[0]},
            torch.stack(keep_acc),
            share,
            rounds,
        )


def tool_columns(flat: list[Completion]) -> list[tuple[int, int, float]]:
    """(tool calls, failed calls, programs' sandbox seconds) per completion."""
    return [
        (len(c.tool_calls), sum(k.failed for k in c.tool_calls), sum(k.seconds for k in c.tool_calls)) for c in flat
    ]


def tool_metrics(columns: list[tuple[int, int, float]]) -> dict:
    """A step's tool use: calls per reply, the share of replies that call, failed calls, and the programs' time
    (identical programs of a step run once and count once)."""
    n = max(1, len(columns))
    return {
        "tool_calls_per_reply": sum(c[0] for c in columns) / n,
        "tool_share": sum(c[0] > 0 for c in columns) / n,
        "tool_errors": sum(c[1] for c in columns),
        "tool_seconds": sum(c[2] for c in columns),
    }


def gather_rollout(ro: Rollout, lengths: list[int], thinks: list[bool], tools: list | None = None):
    """What the step's metrics read of every process's rollout, joined: a Rollout of rewards (completions reduced
    to their finish reasons), lengths, think flags, the number of groups and the tool columns."""
    G = ro.rewards.shape[1]
    mine = dict(
        rewards=ro.rewards.tolist(),
        correct=ro.correct.tolist(),
        lengths=lengths,
        thinks=thinks,
        finish=[c.finish_reason for c in ro.flat],
        parts={k: v.tolist() for k, v in ro.parts.items()},
        tools=tools or [],
    )
    every = dist.gather(mine)
    cat = lambda key: [x for part in every for x in part[key]]  # noqa: E731
    matrix = lambda rows: torch.tensor(rows, dtype=torch.float64).view(-1, G)  # noqa: E731
    names = [k for part in every for k in part["parts"]]
    parts = {k: matrix([x for part in every for x in part["parts"].get(k, [])]) for k in dict.fromkeys(names)}
    flat = [Completion(0, "", [], [], f) for f in cat("finish")]
    joined = Rollout(
        [], [], [], matrix(cat("rewards")), parts, matrix(cat("correct")), ro.zero_variance_share, ro.rounds
    )
    tool_rows = None if tools is None else [tuple(t) for t in cat("tools")]  # no tool: no tool metrics, as alone
    return joined, flat, cat("lengths"), cat("thinks"), len(cat("rewards")), tool_rows
