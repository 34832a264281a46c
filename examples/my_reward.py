"""An example user reward, loadable as `--reward examples/my_reward.py:concise_correct`.

A reward is a plain function `f(completions, **columns) -> list[float | None]`: one value per completion,
None where it cannot judge. Dataset columns (here `answer`) arrive as keyword lists; accept **kwargs for the rest.
"""

from r1lab.rewards import accuracy, completion_text


def concise_correct(completions, answer, max_chars=400, **kwargs):
    """Accuracy, minus up to 0.5 for long completions: a right answer in fewer characters scores higher."""
    correct = accuracy(completions, answer=answer, **kwargs)
    rewards = []
    for completion, ok in zip(completions, correct):
        if ok is None:
            rewards.append(None)
            continue
        length = len(completion_text(completion))
        rewards.append(ok - 0.5 * min(1.0, length / max_chars))
    return rewards
