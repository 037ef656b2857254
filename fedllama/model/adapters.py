"""Strict get/set of adapter state (LoRA's or a dense kind's), deltas, PEFT-format save/load.

Keys are peft's state-dict keys without the adapter name (``get_peft_model_state_dict``), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` — identical on every client.
Under DoRA (Liu et al., ICML 2024; ``lora.use_dora``) the state also holds each adapted layer's
magnitude vector, ``...q_proj.lora_magnitude_vector`` (out_features,), which travels, merges and
is saved like A and B (``PeftModel.from_pretrained`` reads it back from the round directory).
peft's own ``set_peft_model_state_dict`` loads with ``strict=False`` and silently ignores a
renamed key; :func:`set_adapter_state` refuses any mismatch instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedllama.merge.interface import AdapterState

PROMPT_EMBEDDINGS = "prompt_embeddings"
"""Prompt and prefix tuning's one key: the virtual tokens' embeddings (peft's prompt encoder)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """Adapter state does not match what the model or the file expects."""


def get_adapter_state(model: Any) -> AdapterState:
    """The LoRA weights of a ``PeftModel`` as detached float32 CPU tensors."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def check_compatible(expected: AdapterState, got: AdapterState, what: str = "adapter") -> None:
    """Raise :class:`AdapterError` unless ``got`` has exactly ``expected``'s keys and shapes."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{what}: keys differ from the model's; missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})"
        )
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise AdapterError(
                f"{what}: {key} has shape {tuple(got[key].shape)}, expected {tuple(ref.shape)}"
            )


def set_adapter_state(model: Any, state: AdapterState) -> None:
    """Load LoRA weights into a ``PeftModel``; every key and shape must match exactly."""
    from peft import set_peft_model_state_dict

    current = get_adapter_state(model)
    check_compatible(current, state)
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if model.active_peft_config.is_prompt_learning:  # loaded into the prompt encoder instead
        unexpected.remove(PROMPT_EMBEDDINGS)
        loaded = model.get_prompt_embedding_to_save(model.active_adapter)
        if not torch.equal(loaded.to("cpu", torch.float32), state[PROMPT_EMBEDDINGS].float()):
            raise AdapterError(f"peft did not load {PROMPT_EMBEDDINGS} into the prompt encoder")
    if unexpected:
        raise AdapterError(f"peft did not load {len(unexpected)} keys, e.g. {unexpected[0]}")


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """``a - b`` key by key (a client's delta: trained - view)."""
    check_compatible(a, b, "delta")
    return {k: a[k] - b[k] for k in a}


def save_adapter(
    directory: str | Path,
    state: AdapterState,
    lora: dict[str, Any],
    base_dir: str | Path,
) -> Path:
    """Write a PEFT adapter directory that ``PeftModel.from_pretrained(base, directory)`` loads.

    Args:
        directory: created if missing.
        state: adapter weights keyed like :func:`get_adapter_state`.
        lora: ``peft.LoraConfig`` keyword arguments (``cfg.lora.peft_kwargs()``), or another
            kind's with its ``peft_type`` (``cfg.adapter.peft_kwargs(layers)``).
        base_dir: local base model directory recorded as ``base_model_name_or_path``.
    """
    from peft import get_peft_config

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"peft_type": "LORA", **lora, "task_type": "CAUSAL_LM"}
    config = get_peft_config({**kwargs, "base_model_name_or_path": str(base_dir)})
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
    return out


def load_adapter(directory: str | Path) -> tuple[AdapterState, dict[str, Any]]:
    """Read a PEFT adapter directory: (weights, adapter_config.json contents).

    Raises:
        AdapterError: the directory lacks either file.
    """
    d = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            raise AdapterError(f"{d} is not a PEFT adapter directory: {name} is missing")
    config = json.loads((d / ADAPTER_CONFIG).read_text())
    return load_file(str(d / ADAPTER_WEIGHTS)), config
