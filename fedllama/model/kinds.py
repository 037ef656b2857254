"""Dense adapter kinds (``adapter.kind``): LLaMA-Adapter, IA³, prompt and prefix tuning.

Each is peft's own, built from ``peft.get_peft_config`` with the kind's ``peft_type``
(``AdapterConfig.peft_kwargs``), so what a client trains is the adapter peft would train alone.
Their state is dense: the same shapes on every client, no rank slots, merged by FedAvg.

- LLaMA-Adapter (Zhang et al., ICLR 2024): per adapted layer ``...self_attn.adaption_prompt``
  (1, adapter_len, hidden) and ``...self_attn.adaption_gate`` (1,), the gate zero at init.
- IA³ (Liu et al., NeurIPS 2022): ``...k_proj.ia3_l`` (out, 1), ``...down_proj.ia3_l``
  (1, in) and so on, ones at init.
- Prompt tuning (Lester et al., EMNLP 2021) and prefix tuning (Li & Liang, ACL 2021): one
  ``prompt_embeddings`` matrix (virtual tokens × embedding width, or × 2·layers·kv width for a
  prefix), peft's random init.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from fedllama.config import Config
from fedllama.model.base import ModelError

LLAMA_ADAPTER_TYPES = ("llama", "mistral")
"""Model types peft's adaption prompt (LLaMA-Adapter) supports."""


def build_dense_model(cfg: Config, base: PreTrainedModel) -> Any:
    """Wrap ``base`` with the dense adapter ``adapter.kind`` names (a ``peft.PeftModel``).

    Raises:
        ModelError: LLaMA-Adapter on an architecture peft does not adapt, or more
            ``adapter.adapter_layers`` than the model has.
    """
    from peft import get_peft_config, get_peft_model

    layers = int(base.config.num_hidden_layers)
    if cfg.adapter.kind == "llama-adapter":
        model_type = str(base.config.model_type)
        if model_type not in LLAMA_ADAPTER_TYPES:
            raise ModelError(
                f"adapter.kind=llama-adapter: peft's adaption prompt supports "
                f"{', '.join(LLAMA_ADAPTER_TYPES)} models, this base is {model_type}; use "
                "adapter.kind=lora, ia3, prompt-tuning or prefix-tuning"
            )
        if cfg.adapter.adapter_layers > layers:
            raise ModelError(
                f"adapter.adapter_layers={cfg.adapter.adapter_layers}: the base has {layers} "
                "layers (0 adapts all of them)"
            )
    config = get_peft_config({**cfg.adapter.peft_kwargs(layers), "task_type": "CAUSAL_LM"})
    return get_peft_model(base, config)


def reset_dense(peft_model: Any) -> None:
    """Re-draw a dense adapter's init in place, as peft draws it when it builds the adapter
    (the caller seeds torch's generator); a LoRA model is left as it is."""
    from peft.tuners.adaption_prompt.layer import AdaptedAttention
    from peft.tuners.ia3 import IA3Layer

    with torch.no_grad():
        for encoder in getattr(peft_model, "prompt_encoder", {}).values():
            encoder.embedding.reset_parameters()  # prompt/prefix tuning: nn.Embedding, N(0, 1)
        for module in peft_model.modules():
            if isinstance(module, IA3Layer):
                for name in module.ia3_l:
                    module.reset_ia3_parameters(name)  # ones: the identity
            elif isinstance(module, AdaptedAttention):
                module.adaption_prompt.normal_()
                module.adaption_gate.zero_()  # the zero-initialised gate
