"""Tokenizers: train a byte-level BPE, and the two prompt formats of the R1 paper as chat templates.

- `r1` (the default template): DeepSeek-R1's chat format. The generation prompt ends with `<think>\\n`, so the
  reply starts inside the thinking and has no opening tag (r1lab.reasoning handles both forms).
- `r1zero`: the plain R1-Zero template of the paper's Table 1, for RL on a base model.
Saved with `save_pretrained`, so `transformers.AutoTokenizer` loads them and renders the same prompts.
The reasoning tags are single tokens in every tokenizer r1lab trains; the tool-call tags (r1lab.tools) too when the
corpus calls the tool, so tokenizers of corpora without tool calls stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TOOL_TAGS = ("<tool>", "</tool>", "<output>", "</output>")  # r1lab.tools' format

R1ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)

# DeepSeek-R1's format: system text first, then <｜User｜>/<｜Assistant｜> turns; earlier assistant turns keep only
# their answer (the thinking of past turns is not fed back); the generation prompt opens the thinking.
R1_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    + ASSISTANT
    + "{{ c }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "<think>\n{% endif %}"
)

# An earlier assistant turn is written back as the model writes a direct answer: an empty think block and the answer
# in its tags (a chat client sends back the answer alone; a reply with its tags keeps its answer part).
R1ZERO_TEMPLATE = (
    "{{ bos_token }}" + R1ZERO_PREAMBLE + "{% for m in messages %}"
    "{% if m['role'] == 'user' %} User: {{ m['content'] }}. Assistant:"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'].split('</think>')[-1].strip() %}"
    "{% if not c.startswith('<answer>') %}{% set c = '<answer> ' + c + ' </answer>' %}{% endif %}"
    " <think> </think> {{ c }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"r1": R1_TEMPLATE, "r1zero": R1ZERO_TEMPLATE}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, individual_digits: bool = True):
    """Train a byte-level BPE on `texts` and return a `transformers` fast tokenizer with R1's special tokens,
    the reasoning tags as single tokens (and the tool-call tags, when a text calls the tool) and both chat
    templates. Digits are split one per token by default, which is what lets a tiny model learn digit-wise
    arithmetic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    tags = TAGS + (TOOL_TAGS if any(TOOL_TAGS[1] in t for t in texts) else ())
    specials = [BOS, EOS, PAD, USER, ASSISTANT]
    min_size = 256 + len(specials) + len(tags)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + special tokens) (got {vocab_size})")
    tok = Tokenizer(models.BPE())
    pieces = [pre_tokenizers.Digits(individual_digits=True)] if individual_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(tags),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_strip_tags(texts, tags), trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )
    fast.chat_template = {"default": R1_TEMPLATE, "r1zero": R1ZERO_TEMPLATE}
    return fast


def _strip_tags(texts: Iterable[str], tags: tuple[str, ...] = TAGS) -> Iterator[str]:
    """The tags become whole tokens afterwards; BPE should spend its merges on the rest."""
    for t in texts:
        for tag in tags:
            t = t.replace(tag, " ")
        yield t


def check_template(template: str, allow_model: bool = True) -> str:
    """A template name a trainer or the evaluation can use, or a ValueError that lists the choices."""
    choices = list(TEMPLATES) + (["model"] if allow_model else [])
    if template not in choices:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(choices)}")
    return template


def carry_template(tokenizer, template: str):
    """Make `template` ('r1' or 'r1zero') the tokenizer's default chat template, so that the model directory it is
    saved with renders the prompts training used, for `r1lab serve`, `chat`, `eval` and any `transformers` user.
    Both r1lab templates stay available by name, and a template the tokenizer had before is kept as 'original'.
    'model' (train with the tokenizer's own template) changes nothing. Returns the tokenizer."""
    if template == "model":
        return tokenizer
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)} or 'model'")
    before = getattr(tokenizer, "chat_template", None)
    named = dict(before) if isinstance(before, dict) else {}
    if isinstance(before, str) and before not in TEMPLATES.values():
        named["original"] = before
    elif isinstance(before, dict) and named.get("default") not in TEMPLATES.values():
        named["original"] = named["default"]
    named.pop("default", None)
    tokenizer.chat_template = {"default": TEMPLATES[template], **named, **TEMPLATES}
    return tokenizer


def render_prompt(tokenizer, prompt: str, template: str = "r1", system: str | None = None) -> str:
    """One user turn rendered with a named template ('r1', 'r1zero'), ending where the model should continue."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return apply_template(tokenizer, messages, template)


def apply_template(tokenizer, messages: list[dict], template: str = "r1", add_generation_prompt: bool = True) -> str:
    """Render messages with a named r1lab template, or with the tokenizer's own when template is 'model'."""
    if template == "model":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use template 'r1' or 'r1zero'")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)} or 'model'")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=TEMPLATES[template]
    )


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_ids(tokenizer, config=None) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS, and the model config's eos_token_id(s)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return sorted(ids)
