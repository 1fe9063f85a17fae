"""Loading a causal LM for a job, choosing its device and dtype, and finding its target layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None = None) -> torch.device:
    """The job's device: the one asked for, else the first CUDA device, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 weights on CUDA (statistics stay fp32) and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_gradient_checkpointing(setting: bool | str, device: torch.device) -> bool:
    """`auto` recomputes activations on CUDA, where they dominate a 7B job's memory; on the
    CPU memory is rarely the limit and the recomputation would only cost time."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def resolve_keep_rotated(setting: bool | str, device: torch.device) -> bool:
    """`auto` holds rotated gradients through the optimizer step on the CPU, where memory is
    rarely the limit, and forms them again on CUDA, where it is."""
    return device.type != "cuda" if setting == "auto" else bool(setting)


def load_model(path: str, dtype: torch.dtype, device: torch.device) -> tuple[PreTrainedModel, Any]:
    """Model and tokenizer through `from_pretrained`; remote code is never executed."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def untie_lm_head(model: PreTrainedModel) -> bool:
    """Give lm_head its own weight when it shares the input embedding's.

    WaRP rotates lm_head's weight while embeddings stay frozen; a tied weight would make
    every lm_head update move the embeddings too. Returns whether anything was untied.
    """
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


@dataclass(frozen=True)
class Target:
    """A linear layer WaRP protects: `name` is its module path in `model.named_modules()`."""

    name: str
    module: nn.Linear

    @property
    def param_name(self) -> str:
        """The weight's key in `model.state_dict()`."""
        return f"{self.name}.weight"

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight


def find_targets(model: nn.Module, target_modules: list[str]) -> list[Target]:
    """Every linear layer whose last name component is listed, in module order."""
    wanted = set(target_modules)
    targets = [
        Target(name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted
    ]
    found = {t.name.rsplit(".", 1)[-1] for t in targets}
    if missing := sorted(wanted - found):
        raise ValueError(f"target_modules {missing} match no linear layer of this model")
    return targets


def set_trainable(model: nn.Module, targets: list[Target], train_other_params: bool) -> None:
    """Target weights always train; every other parameter only when asked to."""
    for param in model.parameters():
        param.requires_grad_(train_other_params)
    for target in targets:
        target.weight.requires_grad_(True)
        if target.module.bias is not None:
            target.module.bias.requires_grad_(train_other_params)
