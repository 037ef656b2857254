"""Local training loop (one client, one round) and evaluation.

A round's local training: AdamW over the LoRA parameters only, ``train.local_steps`` optimizer
steps of ``train.grad_accum`` micro-batches each, warmup + schedule, gradient clipping and an
optional FedProx proximal term ``(mu/2)·||w - w_view||²`` that pulls the adapter towards the
global view it started from (Li et al., MLSys 2020).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedllama.config import TrainConfig
from fedllama.data import Encoded, collate

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a round of local training reports."""

    train_loss: float
    """Mean loss over the round's micro-batches (without the FedProx term)."""
    num_examples: int
    """Distinct training examples this client holds (the aggregation weight)."""
    steps: int
    seconds: float
    tokens: int
    """Tokens processed (padding included), for throughput."""


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    total = cfg.local_steps

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(
    examples: Sequence[Encoded], batch_size: int, rng: random.Random
) -> Any:  # an endless iterator of batches, reshuffled every epoch (model.replay replays it)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        yield [examples[i] for i in order[:batch_size]]
        del order[:batch_size]


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def train_local(
    model: Any,
    examples: Sequence[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the model's LoRA parameters in place for one round.

    Args:
        model: a ``peft.PeftModel`` whose adapter holds the global view.
        examples: tokenized training examples (non-empty).
        cfg: local training settings.
        pad_id: padding token id.
        seed: seeds the batch order (vary it by round and client).
        progress: called as ``progress(step, loss)`` after each optimizer step.
    """
    if not examples:
        raise ValueError("train_local needs at least one training example")
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.fedprox_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    stream = batches(examples, cfg.batch_size, random.Random(seed))
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    tokens = 0
    for step in range(cfg.local_steps):
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in collate(next(stream), pad_id).items()}
            tokens += int(batch["input_ids"].numel())
            loss = answer_loss(model, batch)
            losses.append(float(loss.detach()))
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * cfg.fedprox_mu * prox
            torch.autograd.backward(loss / cfg.grad_accum)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, sum(losses[-cfg.grad_accum :]) / cfg.grad_accum)
    model.eval()
    return TrainResult(
        train_loss=sum(losses) / len(losses),
        num_examples=len(examples),
        steps=cfg.local_steps,
        seconds=time.perf_counter() - start,
        tokens=tokens,
    )


def token_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) aligned with ``input_ids`` (B, T): prompt tuning's virtual tokens, which
    peft puts in front of the input, are cut off."""
    logits: torch.Tensor = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -input_ids.shape[1] :]


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and LM head of a peft model's causal LM, to run the head only where a
    loss is taken; None where peft's own forward must run (prompt and prefix tuning add virtual
    tokens or a cache there). Every supported architecture's causal LM holds its decoder stack
    at ``.model`` and computes its logits as ``lm_head(model(...).last_hidden_state)`` (no
    soft-capping or scaling); ``get_decoder()`` is not used: Llama 4's returns the causal LM
    itself (its ``base_model_prefix`` names no attribute)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or config.is_prompt_learning:
        return None
    causal = model.get_base_model()
    decoder = getattr(causal, "model", None)
    if not isinstance(decoder, torch.nn.Module):
        return None
    return decoder, causal.get_output_embeddings()


def answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (n, V) at the n positions whose next token is an answer token (a label other
    than -100), row by row, and those tokens (n,).

    The LM head runs at those positions only: on a small model with a large vocabulary (the
    tiny model: hidden 64, 49,152 tokens) the head and its softmax over every prompt position
    are most of a training step. The logits equal the full forward's at those positions."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    parts = _decoder_and_head(model)
    if parts is None:
        logits = token_logits(model, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
    else:
        decoder, head = parts
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = head(hidden[:, :-1][mask])
    return logits, labels[mask]


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's answer tokens: transformers' causal-LM loss."""
    logits, targets = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(model: Any, examples: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    """Mean per-token loss on the answer tokens of ``examples`` (NaN when empty)."""
    if not examples:
        return float("nan")
    device = model_device(model)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        logits, targets = answer_logits(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        count += int(targets.numel())
    return total / max(count, 1)
