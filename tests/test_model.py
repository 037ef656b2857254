"""Base models: tiny, local paths, NF4 on CPU (bitsandbytes CPU backend), the on-disk cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedllama import data, model
from fedllama.config import Config, ModelConfig
from fedllama.model import ModelError, adapters, train


def test_tiny_model_is_a_small_llama_with_a_chat_tokenizer(tiny_cfg: Config) -> None:
    base = model.load_base(tiny_cfg.model)
    tok = model.load_tokenizer(model.resolve_base_dir(tiny_cfg.model))
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 2
    assert tok.chat_template is not None and len(tok) == base.config.vocab_size


def test_model_path_must_be_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        model.resolve_base_dir(ModelConfig(path=str(tmp_path)))


def test_model_path_is_used_as_given(tiny_cfg: Config) -> None:
    tiny_dir = model.resolve_base_dir(tiny_cfg.model)
    assert model.resolve_base_dir(ModelConfig(path=str(tiny_dir))) == tiny_dir


def test_unknown_target_module_is_named(tiny_cfg: Config) -> None:
    cfg = replace(tiny_cfg, lora=replace(tiny_cfg.lora, target_modules=["qkv"]))
    with pytest.raises(ModelError, match=r"\['qkv'\] match no module"):
        model.build_lora_model(cfg, model.load_base(cfg.model))


def test_cuda_device_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.fail("this test is meaningful on a CPU-only machine; run it there")
    with pytest.raises(ModelError, match="no CUDA device"):
        model.resolve_device(ModelConfig(device="cuda"))


def test_compute_dtype_is_float32_on_cpu() -> None:
    cfg = ModelConfig()
    assert model.resolve_compute_dtype(cfg, torch.device("cpu")) == torch.float32
    assert (
        model.resolve_compute_dtype(replace(cfg, compute_dtype="bfloat16"), torch.device("cpu"))
        == torch.bfloat16
    )


@pytest.fixture
def nf4_cfg(tiny_cfg: Config) -> Config:
    return replace(tiny_cfg, model=replace(tiny_cfg.model, quantization="nf4"))


def _linear4bit_weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    import bitsandbytes as bnb

    return {
        name: mod.weight.data.clone()
        for name, mod in m.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit)
    }


def test_nf4_quantizes_linears_trains_lora_and_never_touches_the_base(nf4_cfg: Config) -> None:
    import bitsandbytes as bnb

    base = model.load_base(nf4_cfg.model)
    lora_model = model.build_lora_model(nf4_cfg, base)
    q_proj = lora_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested, "double quantization"
    before = _linear4bit_weights(lora_model)
    adapter_before = adapters.get_adapter_state(lora_model)
    tok = model.load_tokenizer(model.resolve_base_dir(nf4_cfg.model))
    examples = data.encode_all(
        tok, data.demo_federation(Path(nf4_cfg.model.cache_dir), 8)["general"], nf4_cfg.data
    )

    train.train_local(lora_model, examples, nf4_cfg.train, int(tok.pad_token_id), seed=0)

    after = _linear4bit_weights(lora_model)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before), "4-bit base weights unchanged"
    adapter_after = adapters.get_adapter_state(lora_model)
    assert any(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_before)


def test_an_nf4_model_trains_with_the_same_gradients_after_an_evaluation(
    nf4_cfg: Config,
) -> None:
    # bitsandbytes repacks NF4 weights for a CPU inference kernel without a backward at the
    # first no-grad eval forward (CPUs with AVX512-BF16); a simulated client evaluates after it
    # trains, and its Ray worker trains the next client on the same model
    lora_model = model.build_lora_model(nf4_cfg, model.load_base(nf4_cfg.model))
    tok = model.load_tokenizer(model.resolve_base_dir(nf4_cfg.model))
    examples = data.encode_all(
        tok, data.demo_federation(Path(nf4_cfg.model.cache_dir), 8)["general"], nf4_cfg.data
    )
    batch = data.collate(examples[:4], int(tok.pad_token_id))
    state = adapters.get_adapter_state(lora_model)
    torch.manual_seed(1)  # B = 0 at init would leave A without a gradient
    adapters.set_adapter_state(
        lora_model, {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    )

    def grads() -> list[torch.Tensor]:
        lora_model.train()
        lora_model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        lora_model(**batch).loss.backward()
        return [p.grad.clone() for p in lora_model.parameters() if p.grad is not None]

    before = grads()
    train.evaluate(lora_model, examples, 4, int(tok.pad_token_id))
    after = grads()

    packed = [
        m.weight.quant_state
        for m in lora_model.modules()
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None
    ]
    assert packed and not any(getattr(s, "packing_format_for_cpu", False) for s in packed)
    assert len(after) == len(before) > 0
    pairs = zip(after, before, strict=True)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in pairs)


def test_quantized_base_is_cached_on_disk_and_reused(nf4_cfg: Config, monkeypatch) -> None:
    model.load_base(nf4_cfg.model)
    cached = [p for p in (Path(nf4_cfg.model.cache_dir) / "quantized").iterdir() if p.is_dir()]
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()

    calls = []
    monkeypatch.setattr(model.base, "_bnb_config", lambda dtype: calls.append(dtype))
    reloaded = model.load_base(nf4_cfg.model)

    assert calls == [], "a cached NF4 base is loaded, not quantized again"
    assert reloaded.is_loaded_in_4bit


def test_lora_model_is_built_once_per_process(tiny_cfg: Config) -> None:
    first, tok = model.get_lora_model(tiny_cfg)
    again, tok_again = model.get_lora_model(
        replace(tiny_cfg, output=replace(tiny_cfg.output, dir="x"))
    )
    assert first is again and tok is tok_again
