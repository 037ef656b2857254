"""Per-token likelihoods of examples' answers under a global model and under its base: what
the membership-inference scores of ``fedllama.experiments.leakage`` are computed from.

Only the answer tokens are measured (labels other than ``IGNORE_INDEX``), as training's loss
counts them. The base is the same model with its adapter disabled (``disable_adapter``), so
one model in memory serves both.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedllama.data import IGNORE_INDEX, Encoded, collate
from fedllama.model.train import answer_logits, model_device

TRIM_EVERY = 8
"""Batches between two :func:`release_freed_memory` calls in :func:`answer_stats`."""


@dataclass
class AnswerStats:
    """One example's answer tokens (n of them) measured for membership inference."""

    logprob: np.ndarray
    """(n,) log p(x_t | x_<t) under the global model (base + adapter)."""
    mean: np.ndarray
    """(n,) mu_t = sum_z p(z | x_<t) log p(z | x_<t): the expected log-probability (Min-K%++)."""
    std: np.ndarray
    """(n,) the standard deviation of log p(z | x_<t) under p(. | x_<t)."""
    base_logprob: np.ndarray
    """(n,) log p(x_t | x_<t) under the base model alone (the reference)."""
    text: str
    """The answer tokens decoded, special tokens dropped (for the zlib ratio)."""


def _token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logits: (n, V) at the positions that predict ``targets`` (n,); returns log p(target),
    the mean and the standard deviation of log p over the vocabulary, each (n,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = logp.gather(1, targets[:, None]).squeeze(1)
    p = logp.exp()
    mean = (p * logp).sum(-1)
    var = ((p * logp * logp).sum(-1) - mean * mean).clamp_min(0.0)
    return chosen, mean, var.sqrt()


def release_freed_memory() -> None:
    """Hand the C allocator's freed pages back to the system (glibc's ``malloc_trim``).

    Scoring thousands of examples interleaves (n, V) temporaries of a few MB with the small
    results kept per example, and glibc keeps the freed temporaries' pages in its heap: on the
    SmolLM2 canaries (4,040 secrets) ``fedllama canaries`` grew to 16 GB. Measured on 202
    secrets: RSS 514 MB before, 1,395 MB after, 678 MB after a trim. A no-op where the C
    library has no ``malloc_trim`` (macOS, musl)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """The C library's ``malloc_trim``, looked up once (None where there is none)."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@torch.no_grad()
def answer_stats(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Encoded],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    with_base: bool = True,
) -> list[AnswerStats]:
    """Measure every example's answer under ``model`` (a ``peft.PeftModel``) and under its
    base (the adapter disabled), ``batch_size`` examples per forward pass.

    Args:
        progress: called as ``progress(done, total)`` after each batch.
        with_base: False skips the base's pass (``base_logprob`` is then NaN): for a measure
            that needs the global model only (canaries' exposure).
    """
    device = model_device(model)
    pad_id = int(tokenizer.pad_token_id)
    model.eval()
    out: list[AnswerStats] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits, targets = answer_logits(model, batch)  # (n, V), (n,): the answer positions
        base_logits = logits
        if with_base:
            with model.disable_adapter():
                base_logits = answer_logits(model, batch)[0]
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        rows = zip(
            torch.split(logits, counts),
            torch.split(base_logits, counts),
            torch.split(targets, counts),
            strict=True,
        )
        for example, (row, base_row, row_targets) in zip(chunk, rows, strict=True):
            chosen, mean, std = _token_stats(row, row_targets)
            base = _token_stats(base_row, row_targets)[0] if with_base else chosen * math.nan
            answer = [t for t in example.labels if t != IGNORE_INDEX]
            text = str(tokenizer.decode(answer, skip_special_tokens=True))
            out.append(AnswerStats(_numpy(chosen), _numpy(mean), _numpy(std), _numpy(base), text))
        if progress is not None:
            progress(len(out), len(examples))
        if (start // batch_size) % TRIM_EVERY == TRIM_EVERY - 1:
            release_freed_memory()
    release_freed_memory()
    return out
