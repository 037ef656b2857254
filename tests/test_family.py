"""The LLaMA family and its neighbours as ``model.path``: tiny random models shaped like Llama 2
(MHA), Llama 3.1 (GQA, llama3 RoPE scaling), Llama 3.2 (tied embeddings), Llama 4 text (MoE),
Mistral and Qwen2 each run a one-round federation (NF4, except Llama 4: its 4-bit copy does not
load back in this transformers, which is refused), and their round directories load with
``peft.PeftModel.from_pretrained``. An unsupported architecture (GPT-2) is refused.

Each run also exercises one adapter setting (DoRA, rsLoRA, a target-module preset, mixed
ranks), so the family covers them without a run per combination (docs/adapters.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GPT2Config,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedllama import config as config_lib
from fedllama import model
from fedllama.client.settings import ClientSetupError, NodeSettings
from fedllama.config import Config, ConfigError
from fedllama.model import ModelError, lora
from fedllama.model.lora import fresh_adapter
from tests.harness import (
    InProcessGrid,
    assert_answer_loss_is_the_full_loss,
    loads_in_peft,
    run,
    tiny_config,
)

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES: dict[str, tuple[type[Any], type[Any], dict[str, Any]]] = {
    "llama2": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 4}),  # MHA
    "llama3.1": (
        LlamaConfig,
        LlamaForCausalLM,
        {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE},  # GQA
    ),
    "llama3.2": (
        LlamaConfig,
        LlamaForCausalLM,
        {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True},
    ),
    "llama4": (
        Llama4TextConfig,
        Llama4ForCausalLM,
        {
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 64,  # each expert's
            "intermediate_size_mlp": 128,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
        },
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {"num_key_value_heads": 2, "sliding_window": 32},
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"num_key_value_heads": 2, "tie_word_embeddings": True},
    ),
}
RUNS = {
    # family: the adapter settings its one round uses
    "llama2": ("lora.target_modules=attention",),
    "llama3.1": (
        "lora.use_dora=true",
        "strategy.name=rank_aware",
        "lora.client_ranks=[2,4]",
    ),
    "llama3.2": (
        "lora.use_rslora=true",
        "lora.target_modules=mlp",
        "strategy.name=zero_pad",
        "lora.client_ranks=[2,4]",
    ),
    "llama4": ("lora.target_modules=attention", "lora.use_dora=true"),
    "mistral": ("lora.target_modules=all-linear", "strategy.name=hetlora", "lora.use_dora=true"),
    "qwen2": ("lora.use_rslora=true", "lora.use_dora=true", "lora.target_modules=mlp"),
}


def _build(directory: Path, family: str, tokenizer_dir: Path) -> Path:
    """A random ``family`` model with the tiny model's tokenizer, saved once per cache."""
    if (directory / "config.json").is_file():
        return directory
    config_class, model_class, shape = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_class(
        **(SMALL | shape),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    model_class(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


@pytest.fixture(scope="module")
def family_cache(cache_dir: Path) -> Path:
    """The family's own model cache (its NF4 copies stay out of the shared cache's
    ``quantized/``, which other tests count), with the bases under ``bases/``."""
    tiny = model.resolve_base_dir(tiny_config(cache_dir, cache_dir / "unused").model)
    root = cache_dir / "family"
    (root / "bases").mkdir(parents=True, exist_ok=True)
    for name in FAMILIES:
        _build(root / "bases" / name, name, tiny)
    return root


@pytest.fixture(scope="module")
def family_dirs(family_cache: Path) -> dict[str, Path]:
    return {name: family_cache / "bases" / name for name in FAMILIES}


def _cfg(family_cache: Path, out: Path, base: Path, *overrides: str) -> Config:
    return tiny_config(
        family_cache,
        out,
        f"model.path={base}",
        "model.quantization=nf4",
        "server.rounds=1",
        "simulation.num_clients=2",
        "train.local_steps=1",
        "train.lr=0.05",
        "data.global_eval_size=4",
        "output.plot=false",
        *overrides,
    )


def _scale(adapter_config: dict[str, Any]) -> float:
    """peft's scale of a saved adapter: lora_alpha/r, or lora_alpha/√r under rsLoRA."""
    r = adapter_config["r"]
    return float(
        adapter_config["lora_alpha"] / (math.sqrt(r) if adapter_config["use_rslora"] else r)
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_one_round_and_its_adapter_loads_in_peft(
    family: str, family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    base = family_dirs[family]
    cfg = _cfg(family_cache, tmp_path / "run", base, *RUNS[family])

    rows = run(InProcessGrid(2), cfg)

    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == 2 and math.isfinite(rows[1]["eval_loss"])
    round_dir = tmp_path / "run" / "round-001"
    saved = json.loads((round_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] is cfg.lora.use_dora and saved["use_rslora"] is cfg.lora.use_rslora
    merged = load_file(str(round_dir / "adapter_model.safetensors"))
    magnitudes = [k for k in merged if k.endswith("lora_magnitude_vector")]
    assert bool(magnitudes) is cfg.lora.use_dora
    if magnitudes:  # trained and merged: no longer DoRA's init
        initial = fresh_adapter(model.get_lora_model(cfg)[0], cfg.data.seed)
        assert not torch.allclose(merged[magnitudes[0]], initial[magnitudes[0]])
    loads_in_peft(round_dir, base)
    for rank in sorted(set(cfg.lora.client_ranks) - {cfg.lora.r}):
        loads_in_peft(round_dir / f"rank-{rank:02d}", base)
        low = json.loads((round_dir / f"rank-{rank:02d}" / "adapter_config.json").read_text())
        assert _scale(low) == pytest.approx(_scale(saved)), "peft's scale equal at every rank"


def test_fresh_adapter_resets_dora_magnitudes_to_the_base_row_norms(
    family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        family_cache,
        tmp_path / "run",
        family_dirs["qwen2"],
        "lora.use_dora=true",
        "model.quantization=none",
    )
    lora_model = model.get_lora_model(cfg)[0]
    first = fresh_adapter(lora_model, 0)
    key = next(k for k in first if k.endswith("lora_magnitude_vector"))
    for name, param in lora_model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.data.mul_(3.0)  # as if a trained adapter had been loaded

    again = fresh_adapter(lora_model, 0)

    torch.testing.assert_close(again[key], first[key])
    weight = dict(lora_model.named_parameters())[
        key.replace("lora_magnitude_vector", "base_layer.weight")
    ]
    torch.testing.assert_close(first[key], weight.detach().float().norm(dim=1))


def test_unsupported_architecture_is_refused_with_the_supported_ones(tmp_path: Path) -> None:
    GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    cfg = tiny_config(tmp_path / "cache", tmp_path / "run", f"model.path={tmp_path / 'gpt2'}")

    with pytest.raises(ModelError) as err:
        model.resolve_base_dir(cfg.model)

    message = str(err.value)
    assert "is a 'gpt2' model; supported architectures" in message
    for model_type in ("llama", "mistral", "qwen2", "llama4_text"):
        assert model_type in message


def test_nf4_llama4_is_quantized_from_its_base_with_its_experts_intact(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    base = family_dirs["llama4"]
    cache = tmp_path / "cache"
    cfg = tiny_config(cache, tmp_path / "run", f"model.path={base}", "model.quantization=nf4")

    nf4 = model.load_base(cfg.model)

    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert isinstance(nf4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    for ours, theirs in zip(nf4.model.layers, full.model.layers, strict=True):
        experts, base_experts = ours.feed_forward.experts, theirs.feed_forward.experts
        torch.testing.assert_close(experts.gate_up_proj, base_experts.gate_up_proj)
        torch.testing.assert_close(experts.down_proj, base_experts.down_proj)
    assert not (cache / "quantized").exists() or not any((cache / "quantized").iterdir())


def test_llama_adapter_is_refused_beyond_llama_and_mistral_and_past_the_layers(
    family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    kind = ("adapter.kind=llama-adapter", "model.quantization=none")
    cfg = _cfg(family_cache, tmp_path / "run", family_dirs["qwen2"], *kind)
    with pytest.raises(ModelError, match="supports llama, mistral models, this base is qwen2"):
        model.get_lora_model(cfg)
    cfg = _cfg(
        family_cache, tmp_path / "run", family_dirs["mistral"], *kind, "adapter.adapter_layers=3"
    )
    with pytest.raises(ModelError, match=r"adapter.adapter_layers=3: the base has 2 layers"):
        model.get_lora_model(cfg)


def test_llama4_routed_experts_train_through_peft_target_parameters(
    family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    base = family_dirs["llama4"]
    params = "[feed_forward.experts.gate_up_proj,feed_forward.experts.down_proj,router.weight]"
    cfg = _cfg(family_cache, tmp_path / "run", base, f"lora.target_parameters={params}")

    rows = run(InProcessGrid(2), cfg)

    assert rows[1]["clients_ok"] == 2 and math.isfinite(rows[1]["eval_loss"])
    round_dir = tmp_path / "run" / "round-001"
    saved_config = json.loads((round_dir / "adapter_config.json").read_text())
    assert sorted(saved_config["target_parameters"]) == sorted(cfg.lora.parameters())
    merged = load_file(str(round_dir / "adapter_model.safetensors"))
    initial = fresh_adapter(model.get_lora_model(cfg)[0], cfg.data.seed)
    experts = [k for k in merged if ".experts." in k and "lora_" in k]
    # each of the 2 layers: gate_up_proj and down_proj, A and B; r slots per expert (2 experts)
    assert len(experts) == 8
    assert all(2 * cfg.lora.r in merged[k].shape for k in experts)
    assert any(not torch.allclose(merged[k], initial[k]) for k in experts if "lora_B" in k)
    router = [k for k in merged if ".router." in k and "lora_" in k]  # an ordinary rank-r pair
    assert len(router) == 4 and all(cfg.lora.r in merged[k].shape for k in router)
    assert any(not torch.allclose(merged[k], initial[k]) for k in router if "lora_B" in k)
    loads_in_peft(round_dir, base)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("lora.client_ranks=[2,8]",), "lora.client_ranks: mixed ranks do not apply"),
        (("lora.use_dora=true",), "lora.use_dora: peft has no DoRA"),
        (("adapter.kind=ia3",), "lora.target_parameters: is a LoRA option"),
        (("lora.target_parameters=shared",), "lora.target_parameters"),
    ],
)
def test_expert_lora_options_it_cannot_take_are_refused(
    overrides: tuple[str, ...], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        config_lib.load(None, ["lora.target_parameters=experts", *overrides])


def test_expert_lora_is_refused_by_other_strategies_and_on_a_base_without_experts(
    family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    from server.app import check

    experts = "lora.target_parameters=experts"
    with pytest.raises(ConfigError, match="strategy hetlora cannot merge expert LoRA"):
        check(config_lib.load(None, [experts, "strategy.name=hetlora"]))
    plain = config_lib.load(None, [experts])
    with pytest.raises(ClientSetupError, match="lora-rank=2: mixed ranks do not apply"):
        NodeSettings.from_node_config({"partition-id": 0, "lora-rank": 2}).rank(plain)
    assert NodeSettings.from_node_config({"lora-rank": plain.lora.r}).rank(plain) == plain.lora.r
    cfg = _cfg(family_cache, tmp_path / "run", family_dirs["llama3.1"], experts)
    with pytest.raises(ModelError, match="lora.target_parameters: .* match no parameter"):
        model.get_lora_model(cfg)
    fused = torch.nn.Module()
    fused.blocks = torch.nn.Module()
    fused.blocks.w = torch.nn.Parameter(torch.zeros(2, 3, 4))
    fused.experts = torch.nn.Module()
    fused.experts.w = torch.nn.Parameter(torch.zeros(2, 3, 4))
    assert lora._in_experts(fused, "experts.w") and not lora._in_experts(fused, "blocks.w")
    router = "lora.target_modules=[q_proj,router]"
    cfg = _cfg(family_cache, tmp_path / "run", family_dirs["llama4"], router)
    with pytest.raises(ModelError, match=r"\['router'\] is Llama 4's router"):
        model.get_lora_model(cfg)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_answer_only_loss_is_the_full_forwards_loss_on_every_family(
    family: str, family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    """``answer_logits`` takes the causal LM's ``.model`` as the decoder stack and
    ``get_output_embeddings()`` as the head: true of each architecture (Llama 4's
    ``get_decoder()`` is the causal LM itself), tied embeddings included."""
    overrides = ("model.quantization=none", "lora.target_modules=all-linear")
    cfg = _cfg(family_cache, tmp_path / "run", family_dirs[family], *overrides)
    peft_model, tok = model.get_lora_model(cfg)
    assert_answer_loss_is_the_full_loss(peft_model, int(tok.pad_token_id))


def test_exact_rules_keep_llama4s_router_out_of_their_residual(
    family_dirs: dict[str, Path], family_cache: Path, tmp_path: Path
) -> None:
    """FLoRA's residual adapter is built from ``lora.target_modules`` too: with ``all-linear``
    on Llama 4 it must leave the router out, as the trainable adapter does (round 2 installs
    it)."""
    overrides = ("lora.target_modules=all-linear", "strategy.name=flora", "server.rounds=2")
    cfg = _cfg(family_cache, tmp_path / "run", family_dirs["llama4"], *overrides)

    rows = run(InProcessGrid(2), cfg)

    assert [r["clients_ok"] for r in rows[1:]] == [2, 2]
    assert math.isfinite(rows[2]["eval_loss"])
    loads_in_peft(tmp_path / "run" / "round-002", family_dirs["llama4"])  # residual folded in
