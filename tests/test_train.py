"""Local training: learning happens, FedProx pulls towards the view, schedules, evaluation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedllama import data, model
from fedllama.config import Config, TrainConfig
from fedllama.model import adapters, train
from tests.harness import assert_answer_loss_is_the_full_loss, tiny_config


@pytest.fixture
def setup(tiny_cfg: Config):
    lora_model, tok = model.get_lora_model(tiny_cfg)
    view = adapters.get_adapter_state(lora_model)
    pool = data.demo_federation(Path(tiny_cfg.model.cache_dir), 16)
    examples = data.encode_all(tok, pool["law-firm"][:8], tiny_cfg.data)
    return lora_model, tok, view, examples


def test_local_training_lowers_loss_on_its_data(setup, tiny_cfg: Config) -> None:
    lora_model, tok, view, examples = setup
    adapters.set_adapter_state(lora_model, view)
    pad = int(tok.pad_token_id)
    before = train.evaluate(lora_model, examples, 8, pad)
    cfg = replace(tiny_cfg.train, local_steps=20, lr=1e-2)

    result = train.train_local(lora_model, examples, cfg, pad, seed=0)

    assert train.evaluate(lora_model, examples, 8, pad) < before - 0.1
    assert result.steps == 20 and result.num_examples == len(examples) and result.tokens > 0


def _distance(lora_model, view) -> float:
    now = adapters.get_adapter_state(lora_model)
    return float(sum(((now[k] - view[k]) ** 2).sum() for k in view))


def test_fedprox_keeps_the_adapter_closer_to_the_view(setup, tiny_cfg: Config) -> None:
    lora_model, tok, view, examples = setup
    distances = {}
    for mu in (0.0, 100.0):
        adapters.set_adapter_state(lora_model, view)
        cfg = replace(tiny_cfg.train, local_steps=10, lr=1e-2, fedprox_mu=mu)
        torch.manual_seed(0)
        train.train_local(lora_model, examples, cfg, int(tok.pad_token_id), seed=0)
        distances[mu] = _distance(lora_model, view)
    assert distances[100.0] < 0.5 * distances[0.0]


def test_gradient_accumulation_sees_accum_times_batch_examples(setup, tiny_cfg: Config) -> None:
    lora_model, _tok, view, examples = setup
    adapters.set_adapter_state(lora_model, view)
    one = train.train_local(
        lora_model,
        examples,
        replace(tiny_cfg.train, local_steps=1, batch_size=2, grad_accum=1),
        0,
        seed=0,
    )
    three = train.train_local(
        lora_model,
        examples,
        replace(tiny_cfg.train, local_steps=1, batch_size=2, grad_accum=3),
        0,
        seed=0,
    )
    assert three.tokens > 2 * one.tokens


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
        ("linear", 0, [1.0, 0.75, 0.5, 0.25]),
        ("cosine", 0, [1.0, 0.8535534, 0.5, 0.1464466]),
        ("constant", 2, [1 / 3, 2 / 3, 1.0, 1.0]),
    ],
)
def test_lr_schedule_factors(schedule: str, warmup: int, expected: list[float]) -> None:
    factor = train._lr_lambda(TrainConfig(local_steps=4, lr_schedule=schedule, warmup_steps=warmup))
    assert [factor(s) for s in range(4)] == pytest.approx(expected)


def test_evaluate_ignores_prompt_tokens(setup) -> None:
    lora_model, _tok, view, _ = setup
    adapters.set_adapter_state(lora_model, view)
    answer = data.Encoded([5, 6, 7, 8], [-100, -100, 7, 8])
    same_answer_other_prompt = data.Encoded([9, 9, 7, 8], [-100, -100, 7, 8])
    a = train.evaluate(lora_model, [answer], 1, 0)
    b = train.evaluate(lora_model, [same_answer_other_prompt], 1, 0)
    assert a != b, "context changes the answer's loss"
    assert train.evaluate(lora_model, [], 1, 0) != train.evaluate(lora_model, [], 1, 0)  # NaN


@pytest.mark.parametrize("kind", ["lora", "llama-adapter", "prompt-tuning"])
def test_the_answer_only_loss_is_the_full_forwards_loss_and_gradient(
    kind: str, cache_dir: Path, tmp_path: Path
) -> None:
    """The LM head runs at answer positions only (the decoder stack called directly), or, for
    prompt tuning's virtual tokens, on peft's forward: loss and gradients must equal those of
    transformers' causal-LM loss over every position (the other architectures:
    tests/test_family.py)."""
    cfg = tiny_config(cache_dir, tmp_path, f"adapter.kind={kind}")
    peft_model, tok = model.get_lora_model(cfg)
    assert_answer_loss_is_the_full_loss(peft_model, int(tok.pad_token_id))
