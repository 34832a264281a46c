"""Get a model ready to train: weights in the chosen dtype, LoRA adapters through `peft`, gradient checkpointing.

Works on any `transformers` causal LM; r1lab's native DeepSeek-V3 takes the dtype and trains in full (LoRA and
gradient checkpointing are transformers features here). A LoRA model is a `peft` model: its checkpoints hold the
adapter only (`restore_adapter` puts it back over the base), and `r1lab.train.run.write_model` merges it into a
plain model on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from r1lab.config import opt
from r1lab.model.checkpoint import CheckpointError, recover

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class HFOptions:
    """How a `transformers` model is loaded and trained."""

    lora_rank: int = opt(0, "0: train every weight; > 0: LoRA adapters of this rank, the base frozen")
    lora_alpha: float = opt(16.0, "adapter scale is alpha / rank")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input")
    lora_target_modules: list[str] = opt(factory=lambda: ["all-linear"], help="module names to adapt, or all-linear")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, slower")
    dtype: str = opt("float32", "weights as loaded and trained: float32, bfloat16 or float16")

    def validate(self) -> HFOptions:
        from r1lab.runtime import parse_dtype

        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (got {self.lora_rank}); 0 trains every weight")
        if self.lora_rank and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0 (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_rank and not self.lora_target_modules:
            raise ValueError(
                "lora_target_modules is empty; name the linear layers to adapt (e.g. q_proj,v_proj) or use all-linear"
            )
        parse_dtype(self.dtype)
        return self

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0


def is_native(model) -> bool:
    from r1lab.model.deepseek import DeepseekV3

    return isinstance(base_model(model), DeepseekV3)


def base_model(model):
    """The model under a LoRA wrapper (whose layers carry the adapters), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_model(model, opts: HFOptions):
    """Cast to `opts.dtype`, then add LoRA adapters and/or turn on gradient checkpointing; returns the model to
    train (a `peft` model when LoRA is on). Parameters not adapted are frozen under LoRA."""
    from r1lab.runtime import parse_dtype

    opts.validate()
    dtype = parse_dtype(opts.dtype)
    if is_native(model):
        if opts.lora or opts.gradient_checkpointing:
            raise ValueError(
                "LoRA and gradient checkpointing apply to transformers models; r1lab's native "
                "DeepSeek-V3 trains in full (set lora_rank 0 and gradient_checkpointing false)"
            )
        return base_model(model).cast(dtype)
    model = model.to(dtype)
    if opts.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"{type(model).__name__} does not support gradient checkpointing; set gradient_checkpointing false"
            )
        # non-reentrant: gradients reach LoRA adapters even though the frozen embeddings need none
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if opts.lora:
        model = add_lora(model, opts)
    return model


def add_lora(model, opts: HFOptions):
    """A `peft` LoRA model over `model` (adapters in float32 whatever the base dtype)."""
    from peft import LoraConfig, get_peft_model

    targets = opts.lora_target_modules
    # peft annotates lora_alpha as int; it only scales the adapters by alpha / rank, so a float works the same
    cfg = LoraConfig(
        r=opts.lora_rank,
        lora_alpha=opts.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=opts.lora_dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"cannot add LoRA to {type(model).__name__} with lora_target_modules={targets}: {e}. "
            f"Its linear layers are named {', '.join(names)}"
        ) from None


def is_adapter_dir(path: str | Path) -> bool:
    """A checkpoint that holds LoRA adapter weights only (written while training with LoRA)."""
    return (recover(Path(path)) / ADAPTER_CONFIG).is_file()


def restore_adapter(model, path: str | Path) -> None:
    """Load the adapter weights saved in `path` into a LoRA model built with the same options, exactly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = recover(Path(path))
    f = path / ADAPTER_WEIGHTS
    if not hasattr(model, "get_base_model"):
        raise CheckpointError(
            f"{path} holds LoRA adapter weights, but the model has no adapters; train with the "
            "same lora_rank as the run that wrote it"
        )
    if not f.is_file():
        raise CheckpointError(f"{f} is missing; the checkpoint is incomplete (start again with --fresh)")
    result = set_peft_model_state_dict(model, load_file(f))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise CheckpointError(
            f"{f} does not fit this model's adapters (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); use the LoRA options of the run that wrote it"
        )


def load_trainable(path: str | Path, opts: HFOptions, device="cpu", resume_from: str | Path | None = None):
    """(model, tokenizer) ready to train: the model at `path` prepared with `opts`. `resume_from` is a checkpoint
    written by `Run.save`: full weights (loaded instead of `path`), or LoRA adapter weights (put over `path`)."""
    from r1lab.model.load import load_model_and_tokenizer, load_tokenizer

    adapter = resume_from is not None and is_adapter_dir(resume_from)
    source = path if resume_from is None or adapter else resume_from
    model, tok = load_model_and_tokenizer(source, device=device)
    model = prepare_model(model, opts)
    if adapter and resume_from is not None:
        restore_adapter(model, resume_from)
        tok = load_tokenizer(resume_from)
    return model, tok


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
