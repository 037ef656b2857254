"""The model a client trains: the base (tiny | embedded SmolLM2 | local HF dir, NF4 or not),
its LoRA wrapping and frozen residual, adapter state I/O, and local training.

``base`` resolves and quantizes the base, ``lora`` wraps it with peft, ``adapters`` reads and
writes adapter state, ``train`` runs the local steps and evaluation.
"""

from fedllama.model.base import (
    ModelError,
    cache_root,
    load_base,
    load_tokenizer,
    resolve_base_dir,
    resolve_compute_dtype,
    resolve_device,
)
from fedllama.model.lora import (
    RESIDUAL_ADAPTER,
    TRAINABLE,
    build_lora_model,
    fresh_adapter,
    get_lora_model,
    set_frozen,
    set_residual,
)

__all__ = [
    "RESIDUAL_ADAPTER",
    "TRAINABLE",
    "ModelError",
    "build_lora_model",
    "cache_root",
    "fresh_adapter",
    "get_lora_model",
    "load_base",
    "load_tokenizer",
    "resolve_base_dir",
    "resolve_compute_dtype",
    "resolve_device",
    "set_frozen",
    "set_residual",
]
