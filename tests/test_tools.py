"""Tool-integrated reasoning: the call format, the tokenizer's tags, and the sampler's pause / run / re-enter loop.

The sampler tests drive a scripted stand-in for a model: it writes ` <think> <tool> PROGRAM </tool>` for a prompt
`run PROGRAM =>`, then reads the tool's output from its context and answers with it, so a reply's answer is right only
if the real program ran in the sandbox and its output entered the context. Programs run in the real sandbox.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from r1lab import sampler as S
from r1lab.sandbox import Result, unavailable
from r1lab.tokenizer import TAGS, TOOL_TAGS, train_tokenizer
from r1lab.tools import PythonTool, ToolLimits, format_output, output_text, program_of, tool_spans

needs_sandbox = pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")


@pytest.fixture(scope="module")
def tok():
    texts = [
        f"run print({a}*{b}) ; <think> <tool> print({a}*{b}) </tool> <output> {a * b} </output> </think> "
        f"<answer> {a * b} </answer> count to ten"
        for a in range(10, 60, 3)
        for b in range(10, 40, 7)
    ]
    return train_tokenizer(texts, vocab_size=320)


# ----------------------------------------------------------------------------- the format


def test_program_is_the_last_call_with_its_surrounding_space_taken_off():
    assert program_of("<think> 1+1 <tool> print(47*38) </tool>") == "print(47*38)"
    assert program_of("<tool> a </tool> <output> 1 </output> <tool> b </tool>") == "b"
    assert program_of("<tool>\n    x = 6\n    print(x * 7)\n  </tool>") == "x = 6\nprint(x * 7)"
    assert program_of("<tool> for i in range(2):\n    print(i) </tool>") == "for i in range(2):\n    print(i)"
    assert program_of("no call </tool>") is None and program_of("<tool> open") is None


def test_the_tool_says_what_the_program_printed_or_why_it_stopped():
    assert output_text(Result("passed", stdout="1786\n")) == "1786"
    assert (
        output_text(Result("failed", stdout="a\n", stderr="Traceback ...\n  x\nZeroDivisionError: division by zero\n"))
        == "a\nZeroDivisionError: division by zero"
    )
    assert output_text(Result("timeout", detail="wall-clock limit of 5.0 s")) == "timeout: wall-clock limit of 5.0 s"
    assert "could not run" in output_text(Result("error", detail="worker died"))
    assert format_output("42") == " <output> 42 </output>" and format_output("") == " <output> </output>"


def test_tool_spans_cut_the_reasoning_into_text_calls_and_outputs():
    text = "so <tool> print(2) </tool> <output> 2 </output> done <tool> x"
    assert tool_spans(text) == [
        ("text", "so "),
        ("call", "<tool> print(2) </tool>"),
        ("text", " "),
        ("output", "<output> 2 </output>"),
        ("text", " done "),
        ("call", "<tool> x"),
    ]
    assert "".join(p for _, p in tool_spans(text)) == text


def test_tool_tags_are_single_tokens_only_in_tokenizers_of_corpora_that_call_the_tool(tok, tiny_tokenizer):
    for tag in TAGS + TOOL_TAGS:
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1, tag
    assert all(len(tiny_tokenizer(t, add_special_tokens=False).input_ids) > 1 for t in TOOL_TAGS)


def test_output_tokens_are_capped_escaped_and_end_with_the_closing_tag(tok):
    tool = PythonTool(tok, ToolLimits(max_output_tokens=24), pool=object())
    ids, text = tool.output_ids(Result("passed", stdout="x" * 500))
    assert len(ids) <= 24 and text.endswith(" ...") and tok.decode(ids).endswith("</output>")
    tool = PythonTool(tok, ToolLimits(max_output_tokens=64), pool=object())
    ids, text = tool.output_ids(Result("passed", stdout="</output> <tool> <｜end▁of▁sentence｜>"))
    assert text == "< /output> < tool> < ｜end▁of▁sentence｜>"
    assert tok.decode(ids).count("</output>") == 1 and tok.eos_token_id not in ids
    assert tok.decode(tool.output_ids(Result("passed", stdout="1786\n"))[0]) == " <output> 1786 </output>"


def test_pretraining_corpus_calls_the_tool_and_leaves_its_output_out_of_the_labels():
    from r1lab.train.pretrain import Corpus, PretrainConfig, build_tokenizer

    cfg = PretrainConfig(
        task_args={"arithmetic": {"min_digits": 2, "max_digits": 3, "ops": "*", "mul_digits": 2}},
        direct_fraction=0.3,
        tool_fraction=0.4,
    ).validate()
    tk = build_tokenizer(cfg)
    corpus = Corpus(cfg, tk)
    texts = [c for _, c in corpus.texts(1, 400)]
    shares = [
        sum(cond(t) for t in texts) / len(texts)
        for cond in (lambda t: "<think> </think>" in t, lambda t: "<tool>" in t, lambda t: "so " in t)
    ]
    assert shares == pytest.approx([0.3, 0.4, 0.3], abs=0.08)
    t = next(t for t in texts if "<tool>" in t)
    a, op, b, out = re.search(r"print\((\d+) (\*) (\d+)\) </tool> <output> (\d+) </output>", t).groups()
    assert int(a) * int(b) == int(out)
    ids, labels = corpus.completion_ids(t)
    assert ids == tk(t, add_special_tokens=False).input_ids  # as the whole text tokenises
    tool_part = tk.decode([i for i, lab in zip(ids, labels) if lab == 0])
    assert tool_part == f" <output> {out} </output>"
    with pytest.raises(ValueError, match="tool_fraction must be in"):
        PretrainConfig(direct_fraction=0.7, tool_fraction=0.4).validate()


# ----------------------------------------------------------------------------- a scripted model


class Script(torch.nn.Module):
    """Writes ` <think> <tool> P </tool>` for a prompt `run P =>` (`calls` times), then ` </think> <answer> X
    </answer>` where X is the last tool output in its context; for `count N =>` it writes N tokens and stops."""

    def __init__(self, tok, calls: int = 1):
        super().__init__()
        self.tok, self.calls = tok, calls
        self.config = type("Cfg", (), {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id})()
        self.enc = lambda s: tok(s, add_special_tokens=False).input_ids

    def next_token(self, ids: list[int]) -> int:
        text = self.tok.decode(ids)
        prompt, _, reply = text.partition("=>")
        opener = " <think>"
        if "<think>\n" in reply:  # a chat template opened the thinking (R1's format)
            reply, opener = reply.split("<think>\n", 1)[1], ""
        if "count" in prompt:
            return self.tok.eos_token_id if len(self.enc(reply)) >= int(prompt.split()[-1]) else self.enc(" x")[0]
        program = prompt.rsplit("run", 1)[1].strip()
        done = reply.count("</output>")
        plan = opener + " <tool> " + program + " </tool>" if done == 0 else " <tool> " + program + " </tool>"
        if done >= self.calls:
            last = re.findall(r"<output> (.*?) </output>", reply, re.S)[-1]
            plan = f" </think> <answer> {last} </answer>"
        head = reply[reply.rfind("</output>") + len("</output>") :] if done else reply
        written = self.enc(head) if head else []
        want = self.enc(plan) + ([self.tok.eos_token_id] if done >= self.calls else [])
        return want[len(written)] if len(written) < len(want) else self.tok.eos_token_id


class ScriptBackend:
    """The sampler's backend interface over a Script: each row's context is kept as a token list."""

    can_merge = True

    def __init__(self, script: Script, step_seconds: float = 0.0):
        self.script, self.device, self.max_len, self.step_seconds = script, torch.device("cpu"), 512, step_seconds

    def _logits(self, contexts):
        out = torch.full((len(contexts), self.script.config.vocab_size), -30.0)
        for i, c in enumerate(contexts):
            out[i, self.script.next_token(c)] = 0.0
        return out

    def prefill(self, prompts, capacity):
        state = [list(p) for p in prompts]
        return state, self._logits(state)

    def decode(self, state, tokens):
        time.sleep(self.step_seconds)
        for c, t in zip(state, tokens.tolist()):
            c.append(t)
        return self._logits(state)

    def keep(self, state, rows):
        return [list(state[i]) for i in rows.tolist()]

    def drop(self, state, gone):
        order = [i for i in range(len(state)) if i not in set(gone)]
        return [state[i] for i in order], order

    def merge(self, a, b):
        return a + b


def scripted(monkeypatch, tok, calls=1, limits=None, reentry="steps", step_seconds=0.0):
    script = Script(tok, calls)
    monkeypatch.setattr(S, "make_backend", lambda model, tokenizer: ScriptBackend(script, step_seconds))
    return S.Sampler(script, tok, tools=PythonTool(tok, limits), reentry=reentry)


GREEDY = S.SamplingParams(max_new_tokens=80, temperature=0)


# ----------------------------------------------------------------------------- the sampler's tool loop


@needs_sandbox
def test_a_reply_calls_the_tool_reads_its_output_and_marks_the_tools_tokens(monkeypatch, tok):
    sampler = scripted(monkeypatch, tok)
    (c,) = sampler.generate(["run print(47*38) =>"], GREEDY)
    assert c.text == " <think> <tool> print(47*38) </tool> <output> 1786 </output> </think> <answer> 1786 </answer>"
    assert c.finish_reason == "stop" and len(c.token_mask) == len(c.token_ids) == len(c.logprobs)
    tool_ids = [t for t, m in zip(c.token_ids, c.token_mask) if m == 0]
    assert tok.decode(tool_ids) == " <output> 1786 </output>"
    assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.token_mask) if m == 0)
    (call,) = c.tool_calls
    assert (call.program, call.output, call.status, call.tokens) == ("print(47*38)", "1786", "passed", len(tool_ids))
    assert call.seconds > 0 and not call.failed


@needs_sandbox
def test_a_failing_program_answers_with_its_error_and_counts_as_failed(monkeypatch, tok):
    (c,) = scripted(monkeypatch, tok).generate(
        ["run print(1/0) =>"], S.SamplingParams(max_new_tokens=160, temperature=0)
    )
    assert "<output> ZeroDivisionError: division by zero </output>" in c.text
    assert c.tool_calls[0].failed and c.tool_calls[0].status == "failed"


@needs_sandbox
def test_limits_end_the_reply_with_a_finish_reason(monkeypatch, tok):
    (c,) = scripted(monkeypatch, tok, calls=3, limits=ToolLimits(max_calls=2)).generate(["run print(2) =>"], GREEDY)
    assert c.finish_reason == "tool_limit" and len(c.tool_calls) == 2 and c.text.endswith("</tool>")
    assert c.text.count("<output>") == 2  # the third call was written, not run
    limits = ToolLimits(max_calls=4, max_output_tokens=16, max_tool_tokens=16)
    (c,) = scripted(monkeypatch, tok, calls=3, limits=limits).generate(["run print(123) =>"], GREEDY)
    assert c.finish_reason == "tool_limit" and sum(1 - m for m in c.token_mask) == 16
    assert [k.tokens for k in c.tool_calls] == [8, 8, 0]  # the third output would pass max_tool_tokens
    short = S.SamplingParams(max_new_tokens=14, temperature=0)
    (c,) = scripted(monkeypatch, tok).generate(["run print(5) =>"], short)
    assert c.finish_reason == "length" and len(c.token_ids) <= 14 and "<output>" not in c.text


@needs_sandbox
def test_rows_that_call_no_tool_are_unchanged_by_tools(native_tiny):
    model, tok = native_tiny
    params = S.SamplingParams(max_new_tokens=20, temperature=1.0, n=3)
    plain = S.Sampler(model, tok).generate(["What is 3 + 4?", "1"], params, seeds=[5, 6])
    tooled = S.Sampler(model, tok, tools=PythonTool(tok)).generate(["What is 3 + 4?", "1"], params, seeds=[5, 6])
    for a, b in zip(plain, tooled):
        assert (a.token_ids, a.logprobs, a.finish_reason) == (b.token_ids, b.logprobs, b.finish_reason)
        assert a.token_mask is None and b.token_mask == [1] * len(b.token_ids) and b.tool_calls == []


@pytest.fixture(scope="module")
def native_tiny(tiny_native_dir):
    from r1lab.model.load import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_native_dir)


@needs_sandbox
def test_other_rows_keep_decoding_while_a_slow_program_runs(monkeypatch, tok):
    slow = "run import time; time.sleep(1.5); print(7) =>"
    for reentry in ("ready", "steps"):
        sampler = scripted(monkeypatch, tok, reentry=reentry, step_seconds=0.002)
        done = {}
        t0 = time.perf_counter()
        outs = sampler.generate(
            [slow, "count 60 =>"],
            GREEDY,
            on_finish=lambda c, done=done, t0=t0: done.setdefault(c.prompt_index, time.perf_counter() - t0),
        )
        assert outs[0].text.endswith("<answer> 7 </answer>") and outs[0].tool_calls[0].seconds >= 1.5
        if reentry == "ready":  # the other row finished long before the program did
            assert done[1] < 1.0 < 1.5 < done[0]
        else:  # the deterministic schedule waits for a program slower than REENTRY_STEPS steps
            assert done[1] > 1.5 and sampler.tool_wait > 1.0


@needs_sandbox
def test_a_paused_row_re_enters_a_fixed_number_of_steps_later(monkeypatch, tok):
    sampler = scripted(monkeypatch, tok)
    batch = sampler.new_batch()
    prompt = sampler.encode("run print(6*7) =>")
    batch.add([prompt, sampler.encode("count 40 =>")], [GREEDY, GREEDY], [0, 1], [None, None])
    while not batch.paused:
        batch.step()
    paused_at = batch.clock
    assert len(batch) == 1 and batch.due() == []
    time.sleep(0.5)  # the program has surely ended: the schedule still says when the row comes back
    for _ in range(S.REENTRY_STEPS - 1):
        batch.step()
        assert batch.due() == []
    batch.step()
    back = batch.due()
    assert len(back) == 1 and batch.clock == paused_at + S.REENTRY_STEPS
    batch.resume(back)
    assert len(batch) == 2 and batch.rows[1].token_mask[-1] == 1  # back, with its next token sampled


@needs_sandbox
def test_identical_programs_run_once_and_identical_contexts_share_one_prefill(monkeypatch, tok):
    sampler = scripted(monkeypatch, tok)
    calls, prefills = [], []
    real, real_prefill = sampler.tools.submit, sampler.backend.prefill
    monkeypatch.setattr(sampler.tools, "submit", lambda program: calls.append(program) or real(program))
    monkeypatch.setattr(
        sampler.backend, "prefill", lambda ctx, cap: prefills.append(len(ctx)) or real_prefill(ctx, cap)
    )
    outs = sampler.generate(
        ["run print(3*3) =>", "run print(4*4) =>"], S.SamplingParams(max_new_tokens=80, temperature=0, n=3)
    )
    assert sorted(calls) == ["print(3*3)", "print(4*4)"]
    assert prefills == [2, 2]  # the two prompts, then the six rows back from their calls: two distinct contexts
    assert [c.text.split("<answer>")[1] for c in outs] == [" 9 </answer>"] * 3 + [" 16 </answer>"] * 3
    assert [k.shared for c in outs for k in c.tool_calls] == [False, True, True] * 2


def test_without_a_sandbox_tools_are_refused_with_the_fix(monkeypatch, tok):
    from r1lab.sandbox import SandboxUnavailable, backends

    monkeypatch.setattr(backends, "_bwrap_problem", lambda: "bubblewrap (bwrap) is not installed: install it")
    monkeypatch.delenv("R1LAB_SANDBOX", raising=False)
    backends.set_default_backend(None)
    with pytest.raises(SandboxUnavailable, match="install it"):
        PythonTool(tok)


@pytest.mark.parametrize("which", ["native", "llama"])
def test_a_kept_cache_fed_the_output_equals_a_prefill_of_the_whole_context(which, request):
    """A row that pauses keeps a copy of its cache (`take`); fed its call's end and the output (`extend`), its
    next-token logits equal those of a fresh prefill of prompt + reply + output, and the batch is untouched."""
    from r1lab.model.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(
        request.getfixturevalue("tiny_native_dir_long" if which == "native" else "tiny_llama_dir")
    )
    backend = S.make_backend(model, tok)
    g = torch.Generator().manual_seed(0)
    ids = lambda *shape: torch.randint(5, len(tok) - 5, shape, generator=g)  # noqa: E731
    prompts = [ids(n).tolist() for n in (9, 14, 6)]
    with torch.inference_mode():
        state, _ = backend.prefill(prompts, 64)
        steps = [ids(3) for _ in range(3)]
        for t in steps:
            backend.decode(state, t)
        kept = backend.take(state, [2, 0])
        fed = [ids(3).tolist(), ids(5).tolist()]
        got = backend.extend(kept, fed)
        whole = [prompts[i] + [int(t[i]) for t in steps] + f for i, f in zip((2, 0), fed)]
        _, ref = backend.prefill(whole, 64)
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        assert state.lengths.tolist() == [len(p) + 3 for p in prompts]
