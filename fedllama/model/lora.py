"""The LoRA-wrapped model: peft's adapter on the base, its frozen residual, a per-process cache.

The 4-bit base weights are never written: adapters are loaded into and read from the LoRA
parameters only, and nothing here merges LoRA into the base. DoRA (Liu et al., ICML 2024) and
rsLoRA (Kalajdzievski, 2023) are peft's own (``lora.use_dora``, ``lora.use_rslora``); with DoRA
the adapter state also holds each layer's magnitude vector (docs/adapters.md).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedllama.config import Config
from fedllama.config.sections import NOT_LINEAR, TARGET_PRESETS
from fedllama.model.base import ModelError, load_base, load_tokenizer, resolve_base_dir
from fedllama.model.kinds import build_dense_model, reset_dense

# ``all-linear`` excludes Llama 4's router (``NOT_LINEAR``), and peft warns wherever a base has
# none: on every LLaMA, Mistral and Qwen2. Nothing is wrong then; the warning is silenced.
warnings.filterwarnings(
    "ignore", message=r"You have passed exclude_modules=\{'router'\} but no modules were excluded"
)

TRAINABLE = "default"
"""peft's name of the adapter clients train (its keys are the adapter state's keys)."""


RESIDUAL_ADAPTER = "residual"
"""The frozen residual adapter of exact strategies (FLoRA, FedEx-LoRA)."""


def build_lora_model(cfg: Config, base: PreTrainedModel) -> Any:
    """Wrap a base model with a trainable LoRA adapter (``peft.PeftModel``), or with the dense
    adapter ``adapter.kind`` names (``fedllama.model.kinds``).

    Raises:
        ModelError: a name in ``lora.target_modules`` (after its preset is resolved) matches no
            module of the base, or one in ``lora.target_parameters`` no parameter.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.model.quantization == "nf4":
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=cfg.train.gradient_checkpointing
        )
    elif cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    if cfg.adapter.dense:
        return build_dense_model(cfg, base)
    lora = LoraConfig(**cfg.lora.peft_kwargs(), task_type="CAUSAL_LM")
    targets = cfg.lora.modules()
    missing = [m for m in targets if not _has_module(base, m)] if isinstance(targets, list) else []
    if missing:
        raise ModelError(
            f"lora.target_modules: {missing} match no module of the base model "
            f"(LLaMA, Mistral and Qwen2 names: q_proj, k_proj, v_proj, o_proj, gate_proj, "
            f"up_proj, down_proj; presets: {', '.join(TARGET_PRESETS)})"
        )
    unmatched = [p for p in cfg.lora.parameters() if not _has_parameter(base, p)]
    if unmatched:
        raise ModelError(
            f"lora.target_parameters: {unmatched} match no parameter of the base model "
            f"(Llama 4 text's routed experts: lora.target_parameters=experts)"
        )
    outside = [p for p in cfg.lora.parameters() if not _in_experts(base, p)]
    if outside:
        raise ModelError(
            f"lora.target_parameters: {outside} are fused (3-D) parameters outside a module "
            "named 'experts'; fedllama tells expert LoRA factors (r slots per expert) by that "
            "name"
        )
    listed = targets if isinstance(targets, list) else []
    not_linear = [m for m in listed if m in NOT_LINEAR and _has_module(base, m)]
    if not_linear:
        raise ModelError(
            f"lora.target_modules: {not_linear} is Llama 4's router, whose forward returns its "
            "top-k scores and logits: peft's LoRA layer cannot wrap it",
            hint="adapt its weight instead: lora.target_parameters=[feed_forward.router.weight]",
        )
    return get_peft_model(base, lora)


def _matching(model: torch.nn.Module, suffix: str) -> list[str]:
    names = [name for name, _ in model.named_parameters()]
    return [name for name in names if name == suffix or name.endswith("." + suffix)]


def _has_parameter(model: torch.nn.Module, suffix: str) -> bool:
    return bool(_matching(model, suffix))


def _in_experts(model: torch.nn.Module, suffix: str) -> bool:
    """Every fused (3-D) parameter ``suffix`` names belongs to a module named ``experts`` (a
    2-D one, e.g. a router's weight, gets an ordinary rank-r factor pair)."""
    params = dict(model.named_parameters())
    return all(
        params[name].ndim <= 2 or f".{name}".rsplit(".", 2)[-2] == "experts"
        for name in _matching(model, suffix)
    )


def _has_module(model: torch.nn.Module, suffix: str) -> bool:
    return any(name.split(".")[-1] == suffix for name, _ in model.named_modules())


def fresh_adapter(lora_model: Any, seed: int) -> dict[str, torch.Tensor]:
    """peft's default LoRA init (A Kaiming-uniform, B zero) drawn from ``seed``, as a state dict.

    The model is cached per process and holds whatever adapter was loaded last, so the initial
    global adapter is re-drawn here rather than read off the model. Under DoRA each magnitude
    vector is re-initialised as peft does, to the row norms of W0 + s·B A (= ‖W0‖ with B = 0).
    A dense adapter (``adapter.kind``) is re-drawn by ``kinds.reset_dense``.
    """
    from peft.tuners.lora import LoraLayer

    from fedllama.model.adapters import get_adapter_state

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset_dense(lora_model)  # draws nothing for a LoRA model
        for module in lora_model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters(TRAINABLE, True)
                if TRAINABLE in module.lora_magnitude_vector:
                    _reset_magnitude(module)
        return get_adapter_state(lora_model)


def _reset_magnitude(module: Any) -> None:
    """DoRA's init of one layer's magnitude, m = ‖W0 + s·B A‖ per output row (m: (out,)),
    computed by peft's own ``DoraLinearLayer.get_weight_norm`` into the existing parameter."""
    from peft.utils.integrations import dequantize_module_weight

    dora = module.lora_magnitude_vector[TRAINABLE]
    lora_a = module.lora_A[TRAINABLE].weight  # (r, in)
    lora_b = module.lora_B[TRAINABLE].weight  # (out, r)
    with torch.no_grad():
        weight = dequantize_module_weight(module.get_base_layer()).to(lora_a.device)
        scaling = module.scaling[TRAINABLE]
        norm = dora.get_weight_norm(weight, lora_b @ lora_a, scaling)
        dora.weight.copy_(norm.to(dora.weight.dtype))


_CACHE: dict[str, tuple[Any, PreTrainedTokenizerBase]] = {}


def set_frozen(lora_model: Any, frozen: frozenset[str]) -> None:
    """Train every factor of the trainable adapter except the ``frozen`` ones (``"lora_A"``,
    ``"lora_B"``); the residual adapter, if any, stays frozen."""
    from fedllama.merge import frozen_key

    for name, param in lora_model.named_parameters():
        if f".{TRAINABLE}." in name and (".lora_A." in name or ".lora_B." in name):
            param.requires_grad_(not frozen_key(name, frozen))
        elif f".{RESIDUAL_ADAPTER}." in name:
            param.requires_grad_(False)


def set_residual(lora_model: Any, residual: dict[str, torch.Tensor], cfg: Config) -> None:
    """Install ``residual`` as a second, frozen LoRA adapter next to the trainable one.

    ``residual`` holds factors keyed like the trainable adapter (B: (out, k), A: (k, in)) whose
    product is the update itself, so the adapter is created with ``r = lora_alpha = k`` (peft
    scale 1). An empty ``residual`` removes the adapter. The base weights are not touched:
    the residual is what FLoRA and FedEx-LoRA would otherwise merge into them.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    from fedllama.merge import rank_of

    if RESIDUAL_ADAPTER in lora_model.peft_config:
        lora_model.delete_adapter(RESIDUAL_ADAPTER)
    if not residual:
        return
    rank = rank_of(residual)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=cfg.lora.modules(),
        exclude_modules=cfg.lora.peft_kwargs().get("exclude_modules"),  # all-linear: no router
    )
    lora_model.add_adapter(RESIDUAL_ADAPTER, config)
    result = set_peft_model_state_dict(lora_model, residual, adapter_name=RESIDUAL_ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if RESIDUAL_ADAPTER in k]
    if unexpected or missing:
        raise ModelError(
            f"residual adapter did not load: unexpected {unexpected[:2]}, missing {missing[:2]}"
        )
    lora_model.base_model.set_adapter([TRAINABLE, RESIDUAL_ADAPTER])
    set_frozen(lora_model, frozenset())  # set_adapter made every active adapter trainable


_CACHE_SIZE = 4
"""LoRA models kept per process: a simulation actor may serve clients of several ranks."""


def _cache_key(cfg: Config) -> str:
    return json.dumps(
        [
            asdict(cfg.model),
            asdict(cfg.adapter),
            cfg.lora.peft_kwargs(),
            cfg.train.gradient_checkpointing,
        ]
    )


def get_lora_model(cfg: Config) -> tuple[Any, PreTrainedTokenizerBase]:
    """A LoRA-wrapped model and its tokenizer, built once per process and reused.

    Callers load the adapter state they need (``adapters.set_adapter_state``) before use; the
    base weights are shared and never modified.
    """
    key = _cache_key(cfg)
    if key not in _CACHE:
        base = load_base(cfg.model)
        tokenizer = load_tokenizer(resolve_base_dir(cfg.model))
        while len(_CACHE) >= _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]  # the oldest
        _CACHE[key] = (build_lora_model(cfg, base), tokenizer)
    return _CACHE[key]
