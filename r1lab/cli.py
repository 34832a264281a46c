"""The `r1lab` command. Each subcommand declares its flags here and imports its module lazily, so
`r1lab --help` is instant and a missing optional dependency only affects the command that needs it."""

from __future__ import annotations

import argparse
import json
import sys

from r1lab import config as C

# ----------------------------------------------------------------------------- generate / info


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a model directory (r1lab or transformers)")
    p.add_argument("model", help="model directory (r1lab checkpoint or transformers causal LM)")
    p.add_argument("--prompt", required=True, help="prompt text, used as is (no chat template)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user turn with the model's chat template"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens whose probability reaches this",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 means no top-k")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason")
    p.set_defaults(run=_run_generate)


def _run_generate(args):
    from r1lab.model.load import load_model_and_tokenizer
    from r1lab.runtime import parse_dtype, pick_device
    from r1lab.sampler import Sampler, SamplingParams

    model, tok = load_model_and_tokenizer(args.model, device=pick_device(args.device), dtype=parse_dtype(args.dtype))
    prompt = args.prompt
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise C.ConfigError(
                f"--chat: {args.model} has no chat template (tokenizer_config.json or "
                "chat_template.jinja); drop --chat and pass the prompt as the model expects it"
            )
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    out = Sampler(model, tok).generate([prompt], params)[0]
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    else:
        print(out.text)


def _add_info(sub):
    p = sub.add_parser("info", help="parameters (total and activated) and KV-cache bytes per token of a model")
    p.add_argument("model", help="model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_info)


def _run_info(args):
    from r1lab.model.load import model_info

    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        print(f"{k:>28}: {v:,}" if isinstance(v, int) else f"{k:>28}: {v}")


# ----------------------------------------------------------------------------- cost


def _add_cost(sub):
    p = sub.add_parser(
        "cost",
        help="parameters, FLOPs, KV cache, memory and training cost of a model config",
        description="Parameters, FLOPs, KV cache, memory and training cost of a model config, from the "
        "config alone. Example: r1lab cost deepseek-v3-671b --tokens 14.8T --gpu H800 "
        "--gpu-hours 2.788M --price 2",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="a preset (deepseek-v3-671b, deepseek-r1-distill-qwen-7b, ...), a model directory or a config.json",
    )
    p.add_argument(
        "--seq-len",
        "--context",
        dest="seq_len",
        type=int,
        default=4096,
        help="sequence length for attention FLOPs and activations; context for the KV cache (default 4096)",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences at once (KV cache, activations)")
    p.add_argument("--tokens", help="training tokens, e.g. 14.8T")
    p.add_argument("--gpu", help="GPU the training ran on, e.g. H800, H100, A100, RTX 3080")
    p.add_argument("--gpu-hours", help="GPU-hours spent, e.g. 2.788M: prints the implied MFU")
    p.add_argument("--mfu", help="assumed MFU in (0, 1]: prints the GPU-hours needed")
    p.add_argument("--price", help="$ per GPU-hour: prints the cost")
    p.add_argument("--peak-dtype", default="bf16", help="dtype of the peak that --mfu refers to (default bf16)")
    p.add_argument(
        "--fits",
        metavar="GPU",
        help="which models and quantisations fit this GPU for inference (all presets, or MODEL only)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_cost)


def _run_cost(args):
    from r1lab import cost_report

    try:
        r = cost_report.report(
            args.model,
            seq_len=args.seq_len,
            batch=args.batch,
            tokens=args.tokens,
            gpu=args.gpu,
            gpu_hours=args.gpu_hours,
            mfu=args.mfu,
            price=args.price,
            peak_dtype=args.peak_dtype,
            fits_gpu=args.fits,
        )
    except (ValueError, FileNotFoundError) as e:
        raise C.ConfigError(str(e)) from None
    print(json.dumps(r, indent=2) if args.json else cost_report.render(r))


# ----------------------------------------------------------------------------- pretrain / eval


def _config_args(p, cls, skip=()):
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with config values (flags override it)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the run directory")
    C.add_arguments(p, cls, skip=skip)


def _add_pretrain(sub):
    from r1lab.train.pretrain import PretrainConfig

    p = sub.add_parser(
        "pretrain",
        help="pretrain the tiny native base model on synthetic verifiable problems",
        description="Train a tokenizer and a tiny DeepSeek-V3 on worked and bare-answer problems; "
        "re-running with the same --out resumes.",
    )
    _config_args(p, PretrainConfig)
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args):
    from r1lab.train.pretrain import PretrainConfig, pretrain

    cfg = C.resolve(PretrainConfig, args, args.config)
    model, tok, run = pretrain(cfg, resume=not args.fresh)
    if not _main_process():
        return
    final = run.metrics()[-1].get("eval", {})
    for task, m in final.items():
        print(
            f"{task}: held-out greedy accuracy {100 * m['greedy']:.1f}%, thinks {100 * m['think_share']:.0f}% "
            f"of the time, mean reply {m['mean_length']:.1f} tokens"
        )
    print(f"model written to {run.model_dir}")


def _main_process() -> bool:
    """False in the processes torchrun started beside rank 0: they train but do not report."""
    from r1lab.train import dist

    return dist.is_main()


def _add_eval(sub):
    from r1lab.eval import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate a model with the R1 protocol (pass@1 over k samples, cons@k)",
        description="Greedy accuracy, pass@1 (mean over k samples at temperature 0.6, top-p 0.95), "
        "cons@k (majority vote) and pass@k. MODEL is a model directory, or a run directory "
        "(`r1lab pipeline`'s --out, or a trainer's): then its final model is evaluated on "
        "the task, task knobs, template and eval settings the run used, unless flags say "
        "otherwise. With --base-url, MODEL is the model name at an OpenAI-compatible "
        "endpoint.",
    )
    p.add_argument("model", help="model or run directory, or the model name served at --base-url")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with eval settings (flags override it)")
    p.add_argument("--out", default=None, help="write the summary and per-problem records as JSON")
    p.add_argument("--base-url", default=None, help="evaluate an OpenAI-compatible endpoint instead of a local model")
    p.add_argument("--api-key", default=None, help="bearer token for --base-url (default: $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=16, help="parallel requests to --base-url")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument(
        "--sandbox",
        choices=("bwrap", "process"),
        default=None,
        help="where code tasks run programs: bwrap (default: bubblewrap isolation) or process (resource "
        "limits only, no filesystem or network isolation; also R1LAB_SANDBOX)",
    )
    C.add_arguments(p, EvalConfig)
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    import os

    from r1lab import eval as E

    if args.concurrency < 1:
        raise C.ConfigError(f"--concurrency must be >= 1 (got {args.concurrency})")
    if args.out and os.path.isdir(args.out):  # checked before the evaluation, which the report would otherwise lose
        raise C.ConfigError(
            f"--out {args.out} is a directory; give the JSON file to write (e.g. {os.path.join(args.out, 'eval.json')})"
        )
    from r1lab.sandbox import set_default_backend

    set_default_backend(args.sandbox)
    model_dir, trained, source = (args.model, {}, None) if args.base_url else E.run_settings(args.model)
    cfg = C.resolve(E.EvalConfig, args, args.config, base=C.merge(E.EvalConfig(), trained)).validate()
    if source is not None:
        shown = ", ".join(f"{k} {json.dumps(v)}" for k, v in trained.items())
        print(f"evaluating {model_dir} with the settings of its run ({source}): {shown}; flags override them")
    problems = E.load_problems(cfg)
    if args.base_url:
        gen = E.endpoint_generator(
            args.base_url, args.model, args.api_key or os.environ.get("OPENAI_API_KEY"), concurrency=args.concurrency
        )
    else:
        from r1lab.model.load import load_model_and_tokenizer
        from r1lab.runtime import parse_dtype, pick_device

        model, tok = load_model_and_tokenizer(model_dir, device=pick_device(args.device), dtype=parse_dtype(args.dtype))
        from r1lab.tools import make_tool

        gen = E.local_generator(
            model, tok, E.resolve_template(cfg, tok), max_batch=cfg.max_batch, tools=make_tool(cfg.tools, tok)
        )
    result = E.evaluate(gen, problems, cfg)
    print(E.render_table(result["summary"]))
    if args.out:
        E.write_report(result, args.out)
        print(f"wrote {args.out}")


def _add_grpo(sub):
    from r1lab.train.grpo import GRPOConfig

    p = sub.add_parser(
        "grpo",
        help="GRPO (R1-Zero) reinforcement learning with verifiable rewards",
        description="GRPO and its variants (Dr. GRPO, DAPO) on a model directory (--model): native "
        "r1lab or any transformers causal LM. Re-running with the same --out resumes.",
    )
    _config_args(p, GRPOConfig)
    p.set_defaults(run=_run_grpo)


def _run_grpo(args):
    from r1lab.train.grpo import GRPOConfig, grpo

    cfg = C.resolve(GRPOConfig, args, args.config)
    _, _, run = grpo(cfg, resume=not args.fresh)
    if not _main_process():
        return
    print(f"model written to {run.model_dir}; metrics in {run.metrics_path}")


# ----------------------------------------------------------------------------- pipeline

PIPELINE_SETS = (
    "pretrain.report_to",
    "grpo.report_to",  # one --report-to for every stage
    "pretrain.out",
    "grpo.out",
    "grpo.model",
    "pretrain.tasks",
    "pretrain.task_args",
    "grpo.tasks",
    "grpo.task_args",
    "pretrain.seed",
    "grpo.seed",
    "grpo.teacher",
    "grpo.teacher_weight",
    "pretrain.tokenizer",
)


def _add_pipeline(sub):
    from r1lab.recipes import PipelineConfig

    p = sub.add_parser(
        "pipeline",
        help="the main job: tokenizer -> tiny base model -> eval -> GRPO -> eval -> report",
        description="R1-Zero in miniature with no arguments. Every stage writes under --out "
        "(default runs/r1zero); re-running with the same --out resumes. --recipe r1 runs "
        "DeepSeek-R1's four stages and --recipe distill compares distillation with RL on a "
        "smaller student, both in <out>/<recipe>/ on top of the r1zero models (made first "
        "when missing). Nested settings take dotted flags (--grpo.steps 40) or a --config "
        "YAML file.",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with pipeline settings (flags override it)")
    # set by the pipeline itself, so not flags: stage directories, the models each stage starts from, the task and
    # the seed (one top-level --task and --seed for all), and the teacher (the distill recipe's on-policy arm)
    C.add_arguments(p, PipelineConfig, skip=PIPELINE_SETS)
    p.set_defaults(run=_run_pipeline)


def _run_pipeline(args):
    from r1lab.recipes import PipelineConfig, run_pipeline

    cfg = C.resolve(PipelineConfig, args, args.config)
    run_pipeline(cfg)


# ----------------------------------------------------------------------------- sft / distill / import-gguf


def _add_sft(sub):
    from r1lab.train.sft import SFTConfig

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat or prompt/completion JSONL",
        description="Fine-tune a model directory (--model: native r1lab or any transformers causal LM) "
        'on --data JSONL: {"messages": [...]} chats (loss on assistant turns) or '
        '{"prompt", "completion"} pairs. Samples are packed without seeing each '
        "other; LoRA and gradient checkpointing take --hf.* flags. Re-running with the "
        "same --out resumes.",
    )
    _config_args(p, SFTConfig)
    p.set_defaults(run=_run_sft)


def _run_sft(args):
    from r1lab.train.sft import SFTConfig, sft

    cfg = C.resolve(SFTConfig, args, args.config)
    _, _, run = sft(cfg, resume=not args.fresh)
    if _main_process():
        _print_sft(run)


def _print_sft(run):
    rows = run.metrics()
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    held = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    if losses:
        print(
            f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps"
            + (f"; held-out loss {held[-1]:.3f}" if held else "")
        )
    print(f"model written to {run.model_dir}; metrics in {run.metrics_path}")


def _add_distill(sub):
    from r1lab.distill import DistillConfig

    p = sub.add_parser(
        "distill",
        help="distil a reasoning teacher into a small student (rejection sampling + SFT, or on-policy)",
        description="The teacher samples --k completions per problem; those correct, well-formed, in "
        "one language, not duplicated and within the length cap are written to "
        "OUT/data.jsonl (counts by rejection reason in OUT/data_stats.json); then the "
        "student is fine-tuned on them (--sft.* flags). Re-running with the same --out "
        "reuses the data and resumes training; --fresh samples again. The teacher is a "
        "model directory (--teacher) or any OpenAI-compatible endpoint that returns "
        "reasoning_content (--teacher-url, --teacher-model): its answers are cached in "
        "OUT/teacher_cache, so a rerun (--fresh too) sends only the requests never "
        "answered; delete that folder to ask again. --method on-policy instead lets the "
        "student sample and the teacher score every sampled token (--onpolicy.* flags: "
        "steps, lr, ...).",
    )
    _config_args(
        p,
        DistillConfig,
        skip=(
            "sft.out",
            "sft.model",
            "sft.data",
            "onpolicy.out",
            "onpolicy.model",
            "onpolicy.teacher",
            "onpolicy.tasks",
            "onpolicy.task_args",
            "onpolicy.seed",
            "onpolicy.template",
        ),
    )
    p.set_defaults(run=_run_distill)


def _run_distill(args):
    from r1lab.distill import DistillConfig, distill

    cfg = C.resolve(DistillConfig, args, args.config)
    _, _, run, counts = distill(cfg, resume=not args.fresh)
    if counts is None:  # on-policy: no dataset, a GRPO run whose advantage is the teacher's per-token signal
        kl = [r["teacher_reverse_kl"] for r in run.metrics() if r.get("teacher_reverse_kl") is not None]
        if kl:
            print(f"reverse KL to the teacher per token: {kl[0]:.3f} -> {kl[-1]:.3f} over {len(kl)} steps")
        print(f"model written to {run.model_dir}; metrics in {run.metrics_path}")
        return
    why = ", ".join(f"{k} {v}" for k, v in counts["rejected"].items() if v) or "none"
    print(
        f"kept {counts['kept']} of {counts['candidates']} teacher samples "
        f"({counts['problems_with_kept']} of {counts['problems']} problems); rejected: {why}"
    )
    if "teacher_usage" in counts:
        from r1lab.distill import usage_line

        print(usage_line(counts["teacher_usage"]))
    _print_sft(run)


def _add_import_gguf(sub):
    p = sub.add_parser(
        "import-gguf",
        help="turn a GGUF file into a safetensors model directory",
        description="Dequantise a GGUF model (llama.cpp's format) into a plain transformers model "
        "directory with its tokenizer and chat template, trainable and servable by r1lab. "
        "The written directory is loaded back and checked before it replaces OUT_DIR.",
    )
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="model directory to write")
    p.add_argument("--dtype", default="float32", help="weights as written: float32 (default), bfloat16 or float16")
    p.set_defaults(run=_run_import_gguf)


def _run_import_gguf(args):
    from r1lab.model.gguf import import_gguf
    from r1lab.model.load import model_info

    path = import_gguf(args.file, args.out_dir, dtype=args.dtype)
    info = model_info(path)
    print(f"{info['model_type']} model with {info['params_stored']:,} parameters written to {path}")


def _add_export_gguf(sub):
    from r1lab.model.gguf_export import QTYPES

    p = sub.add_parser(
        "export-gguf",
        help="write a model directory as a GGUF file for llama.cpp",
        description="Write an r1lab DeepSeek-V3 (llama.cpp's deepseek2) or a Llama, Mistral or Qwen2 "
        "model directory as one GGUF file with its tokenizer and chat templates. Settings "
        "llama.cpp would compute differently are refused by name; nothing is approximated.",
    )
    p.add_argument("model", help="model directory")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument(
        "--type",
        default="f32",
        choices=QTYPES,
        help="weight storage: f32 (default), f16 or q8_0; norms, biases and the expert router stay f32",
    )
    p.add_argument(
        "--skip-nfc",
        action="store_true",
        help="write a tokenizer whose NFC normaliser llama.cpp lacks (Qwen2's) instead of refusing it",
    )
    p.set_defaults(run=_run_export_gguf)


def _run_export_gguf(args):
    from r1lab.model.gguf_export import export_gguf

    result = export_gguf(args.model, args.out, qtype=args.type, skip_nfc=args.skip_nfc)
    for line in result.dropped:
        print(f"r1lab export-gguf: left out {line}", file=sys.stderr)
    types = ", ".join(f"{n} {kind}" for kind, n in sorted(result.types.items()))
    print(f"{result.arch} GGUF ({types} tensors) written to {result.path}")


# ----------------------------------------------------------------------------- serve / chat


def _add_serve(sub):
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible API with reasoning_content, and a web chat page",
        description="Serve a model directory over an OpenAI-compatible API (/v1/chat/completions with "
        "the thinking in reasoning_content, /v1/completions, /v1/models, /health) and a "
        "web chat page at /. Concurrent requests share one continuously refilled batch.",
    )
    p.add_argument("model", help="model directory (r1lab checkpoint or transformers causal LM)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $R1LAB_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn log level: warning, info, debug",
    )
    import dataclasses

    from r1lab.serve.limits import ServerLimits

    limits = {f.name: f for f in dataclasses.fields(ServerLimits)}
    for name in ("max_body_mb", "header_timeout", "body_timeout", "max_connections"):
        f = limits[name]
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"{f.metadata['help']} (default {f.default})",
        )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help=limits["allowed_hosts"].metadata["help"] + "; repeatable",
    )
    _tool_flags(p, "on this server")
    p.set_defaults(run=_run_serve)


def _tool_flags(p, where: str) -> None:
    p.add_argument(
        "--tools",
        choices=("none", "python"),
        default="none",
        help=f"let replies call a Python tool while they think (off by default): the programs the model "
        f"writes run {where}, in the sandbox (docs/tools.md)",
    )
    p.add_argument(
        "--sandbox",
        choices=("bwrap", "process"),
        default=None,
        help="where --tools programs run: bwrap (default: bubblewrap isolation) or process (resource "
        "limits only, no filesystem or network isolation; also R1LAB_SANDBOX)",
    )


def _run_serve(args):
    import os

    from r1lab.runtime import parse_dtype, pick_device
    from r1lab.serve.app import serve
    from r1lab.serve.limits import ServerLimits

    if not 0 <= args.port <= 65535:
        raise C.ConfigError(f"--port must be in 0..65535 (got {args.port})")
    if args.max_batch < 1:
        raise C.ConfigError(f"--max-batch must be >= 1 (got {args.max_batch})")
    limits = ServerLimits(
        max_body_mb=args.max_body_mb,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        allowed_hosts=tuple(args.allowed_host),
    )
    from r1lab.sandbox import set_default_backend

    set_default_backend(args.sandbox)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("R1LAB_API_KEY"),
        model_name=args.model_name,
        max_batch=args.max_batch,
        device=pick_device(args.device),
        dtype=parse_dtype(args.dtype),
        log_level=args.log_level,
        limits=limits.validate(),
        tools=args.tools,
    )


def _add_chat(sub):
    p = sub.add_parser(
        "chat",
        help="terminal chat that shows the model's thinking",
        description="Talk to a model directory in the terminal: replies stream, the thinking dimmed "
        "above the answer. /new starts over, /exit leaves, Ctrl-C stops a reply.",
    )
    p.add_argument("model", help="model directory (r1lab checkpoint or transformers causal LM)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 means greedy")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply (default: up to 4096)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a new one per reply)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    _tool_flags(p, "on this machine")
    p.set_defaults(run=_run_chat)


def _run_chat(args):
    from r1lab.runtime import parse_dtype, pick_device
    from r1lab.serve.terminal import run_chat

    if args.max_tokens is not None and args.max_tokens < 1:
        raise C.ConfigError(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    if not 0 <= args.temperature <= 2:
        raise C.ConfigError(f"--temperature must be in [0, 2] (got {args.temperature})")
    from r1lab.sandbox import set_default_backend

    set_default_backend(args.sandbox)
    run_chat(
        args.model,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        system=args.system,
        device=pick_device(args.device),
        dtype=parse_dtype(args.dtype),
        tools=args.tools,
    )


# ----------------------------------------------------------------------------- main

BUILDERS = [
    _add_generate,
    _add_info,
    _add_cost,
    _add_pretrain,
    _add_eval,
    _add_grpo,
    _add_pipeline,
    _add_sft,
    _add_distill,
    _add_import_gguf,
    _add_export_gguf,
    _add_serve,
    _add_chat,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1lab", description="DeepSeek-R1, open and runnable.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: R1LAB_THREADS or the cores this process may use)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for build in BUILDERS:
        build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from r1lab.model.checkpoint import CheckpointError
    from r1lab.runtime import set_threads, settle_allocator
    from r1lab.train.run import TrainingError

    try:
        set_threads(args.threads)
        settle_allocator()
        args.run(args)
    except (C.ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        # Bad input: one line that names the problem; a bug elsewhere still shows its traceback.
        print(f"r1lab {args.command}: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # training diverged: what was kept, and what to do
        print(f"r1lab {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`r1lab cost ... | head`): nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
