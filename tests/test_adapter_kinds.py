"""Dense adapter kinds (``adapter.kind``): LLaMA-Adapter, IA³, prompt and prefix tuning.

Each kind runs a federation whose round directory ``PeftModel.from_pretrained`` loads with every
tensor unchanged; FedAvg merges them (plain and under SecAgg+); mixed ranks, LoRA options and
LoRA-only strategies are refused naming the key (docs/adapters.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import server.app
from fedllama import data, model
from fedllama.client.settings import ClientSetupError, NodeSettings
from fedllama.config import ConfigError
from fedllama.model import train
from fedllama.model.export import export_merged
from fedllama.model.serve import ServeError, open_round
from tests.harness import InProcessGrid, loads_in_peft, run, tiny_config

KINDS = ("llama-adapter", "ia3", "prompt-tuning", "prefix-tuning")
FEW = ("server.rounds=1", "simulation.num_clients=2", "train.local_steps=3", "train.lr=0.05")
FEW += ("data.global_eval_size=4", "output.plot=false")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_federates_and_its_round_loads_in_peft(
    kind: str, cache_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(cache_dir, tmp_path / "run", f"adapter.kind={kind}", *FEW)
    server.app.check(cfg)

    rows = run(InProcessGrid(2), cfg)

    assert rows[1]["clients_ok"] == 2 and math.isfinite(rows[1]["eval_loss"])
    round_dir = tmp_path / "run" / "round-001"
    initial = load_file(str(tmp_path / "run" / "round-000" / "adapter_model.safetensors"))
    saved = load_file(str(round_dir / "adapter_model.safetensors"))
    assert saved.keys() == initial.keys() and not any("lora_" in k for k in saved)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), "the round trained nothing"
    loads_in_peft(round_dir, model.resolve_base_dir(cfg.model))


@pytest.mark.parametrize("kind", ["llama-adapter", "ia3"])
def test_a_dense_kind_trains_on_an_nf4_base(kind: str, cache_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        cache_dir, tmp_path / "run", f"adapter.kind={kind}", *FEW, "model.quantization=nf4"
    )

    rows = run(InProcessGrid(2), cfg)

    assert rows[1]["clients_ok"] == 2 and rows[1]["eval_loss"] < rows[0]["eval_loss"]
    initial = load_file(str(tmp_path / "run" / "round-000" / "adapter_model.safetensors"))
    saved = load_file(str(tmp_path / "run" / "round-001" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), "the round trained nothing"


@pytest.mark.parametrize(("asked", "layers"), [(0, 2), (1, 1)])  # 0: all (the tiny model has 2)
def test_llama_adapter_saves_the_layers_it_adapts(
    asked: int, layers: int, cache_dir: Path, tmp_path: Path
) -> None:
    # the round directory's adapter_layers is counted from the gates the state holds
    cfg = tiny_config(
        cache_dir, tmp_path / "run", "adapter.kind=llama-adapter",
        f"adapter.adapter_layers={asked}", *FEW,
    )  # fmt: skip

    run(InProcessGrid(2), cfg)

    round_dir = tmp_path / "run" / "round-001"
    saved = load_file(str(round_dir / "adapter_model.safetensors"))
    assert sum(key.endswith("adaption_gate") for key in saved) == layers
    peft_config = json.loads((round_dir / "adapter_config.json").read_text())
    assert (peft_config["peft_type"], peft_config["adapter_layers"]) == ("ADAPTION_PROMPT", layers)
    loads_in_peft(round_dir, model.resolve_base_dir(cfg.model))


def test_fedavg_of_a_dense_kind_under_secagg_equals_the_plain_mean(
    cache_dir: Path, tmp_path: Path
) -> None:
    """Three clients of unequal sizes (weights differ) from a non-zero global (IA³'s ones)."""
    states = {}
    for mode in ("plain", "secure"):
        out = tmp_path / mode
        cfg = tiny_config(
            cache_dir, out, "adapter.kind=ia3", *FEW, "simulation.num_clients=3",
            f"secagg.enabled={mode == 'secure'}", "data.partition=dirichlet",
        )  # fmt: skip
        server.app.check(cfg)
        rows = run(InProcessGrid(3), cfg)
        assert rows[1]["clients_ok"] == 3
        states[mode] = load_file(str(out / "round-001" / "adapter_model.safetensors"))
    for key, value in states["plain"].items():
        assert not torch.allclose(value, torch.ones_like(value)), key
        torch.testing.assert_close(states["secure"][key], value, rtol=0, atol=1e-5)


def test_fresh_dense_adapter_is_peft_init_drawn_from_the_seed(
    cache_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(cache_dir, tmp_path / "run", "adapter.kind=llama-adapter")
    peft_model = model.get_lora_model(cfg)[0]
    first = model.fresh_adapter(peft_model, 3)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data.add_(1.0)  # as if a trained adapter had been loaded
    again, other = model.fresh_adapter(peft_model, 3), model.fresh_adapter(peft_model, 4)
    gates = [k for k in first if k.endswith("adaption_gate")]
    assert len(gates) == 2 and all(not first[k].any() for k in gates)  # the zero-init gate
    for key, value in first.items():
        torch.testing.assert_close(again[key], value)
    assert not torch.equal(
        other[gates[0].replace("gate", "prompt")], first[gates[0].replace("gate", "prompt")]
    )


def test_prompt_tuning_eval_loss_is_peft_loss_on_the_answers(
    cache_dir: Path, tmp_path: Path
) -> None:
    """Prompt tuning puts virtual tokens in front: scoring must cut them off the logits."""
    cfg = tiny_config(cache_dir, tmp_path / "run", "adapter.kind=prompt-tuning")
    peft_model, tok = model.get_lora_model(cfg)
    pool = data.load_pool(cfg.data, model.cache_root(cfg.model))
    examples = data.encode_all(tok, next(iter(pool.values()))[:1], cfg.data)
    batch = data.collate(examples, int(tok.pad_token_id))
    with torch.no_grad():
        expected = float(peft_model(**batch).loss)
    got = train.evaluate(peft_model, examples, 4, int(tok.pad_token_id))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.client_ranks=[2,4]", "lora.client_ranks"),
        ("lora.use_dora=true", "lora.use_dora"),
        ("lora.use_rslora=true", "lora.use_rslora"),
    ],
)
def test_lora_options_with_a_dense_kind_are_refused_naming_the_key(
    override: str, key: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: .*adapter.kind=ia3"):
        tiny_config(tmp_path, tmp_path / "run", "adapter.kind=ia3", override)


def test_lora_only_strategy_and_node_rank_are_refused_with_a_dense_kind(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, tmp_path / "run", "adapter.kind=prefix-tuning", "strategy.name=hetlora"
    )
    with pytest.raises(ConfigError, match=r"^adapter.kind: strategy hetlora .*use one of fedavg$"):
        server.app.check(cfg)
    with pytest.raises(ClientSetupError, match="lora-rank=2: mixed ranks apply to LoRA only"):
        NodeSettings.from_node_config({"partition-id": 0, "lora-rank": 2}).rank(cfg)
    with pytest.raises(ConfigError, match="adapter.kind: got 'adapters'"):
        tiny_config(tmp_path, tmp_path / "run", "adapter.kind=adapters")


def test_merged_export_refuses_prompt_kinds_and_merges_ia3(cache_dir: Path, tmp_path: Path) -> None:
    for kind in ("prompt-tuning", "ia3"):
        out = tmp_path / kind
        cfg = tiny_config(cache_dir, out, f"adapter.kind={kind}", *FEW, "train.local_steps=1")
        run(InProcessGrid(2), cfg)
        source = open_round(out / "round-001")
        if kind == "prompt-tuning":
            with pytest.raises(ServeError, match="PROMPT_TUNING adapter cannot be merged"):
                export_merged(source, tmp_path / "merged-prompt")
            continue
        merged = export_merged(source, tmp_path / "merged-ia3")
        assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"
