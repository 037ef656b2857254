"""Adapter state: strict get/set, deltas, PEFT-format round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllama import model
from fedllama.config import Config
from fedllama.model import adapters
from fedllama.model.adapters import AdapterError


@pytest.fixture
def lora_model(tiny_cfg: Config):
    base = model.load_base(tiny_cfg.model)
    return model.build_lora_model(tiny_cfg, base)


def test_keys_have_no_adapter_name_and_are_float32(lora_model) -> None:
    state = adapters.get_adapter_state(lora_model)
    assert state and all(".default." not in k for k in state)
    assert any(k.endswith("q_proj.lora_A.weight") for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_set_then_get_returns_the_same_weights(lora_model) -> None:
    state = {k: torch.randn_like(v) for k, v in adapters.get_adapter_state(lora_model).items()}
    adapters.set_adapter_state(lora_model, state)
    back = adapters.get_adapter_state(lora_model)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_renamed_key_is_an_error_not_silently_ignored(lora_model) -> None:
    state = adapters.get_adapter_state(lora_model)
    key = next(iter(state))
    state[key.replace("q_proj", "qq_proj")] = state.pop(key)
    with pytest.raises(AdapterError, match="missing .*unexpected"):
        adapters.set_adapter_state(lora_model, state)


def test_missing_key_and_wrong_shape_are_errors(lora_model) -> None:
    state = adapters.get_adapter_state(lora_model)
    key = next(iter(state))
    partial = {k: v for k, v in state.items() if k != key}
    with pytest.raises(AdapterError, match=r"missing \[.*\] \(1\)"):
        adapters.set_adapter_state(lora_model, partial)
    wrong = dict(state)
    wrong[key] = torch.zeros(1, 1)
    with pytest.raises(AdapterError, match=r"shape \(1, 1\), expected"):
        adapters.set_adapter_state(lora_model, wrong)


def test_delta_is_trained_minus_view() -> None:
    a = {"k": torch.tensor([3.0, 5.0])}
    b = {"k": torch.tensor([1.0, 1.0])}
    assert adapters.subtract(a, b)["k"].tolist() == [2.0, 4.0]
    with pytest.raises(AdapterError):
        adapters.subtract(a, {"j": torch.tensor([1.0, 1.0])})


def test_saved_directory_round_trips_through_peft(
    lora_model, tiny_cfg: Config, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = {k: torch.randn_like(v) for k, v in adapters.get_adapter_state(lora_model).items()}
    base_dir = model.resolve_base_dir(tiny_cfg.model)
    adapters.save_adapter(tmp_path / "a", state, tiny_cfg.lora.peft_kwargs(), base_dir)

    loaded_state, config = adapters.load_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "a"
    )

    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["r"] == tiny_cfg.lora.r
    from_peft = adapters.get_adapter_state(peft_model)
    assert all(
        torch.equal(loaded_state[k], state[k]) and torch.equal(from_peft[k], state[k])
        for k in state
    )


def test_loading_a_non_adapter_directory_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        adapters.load_adapter(tmp_path)
