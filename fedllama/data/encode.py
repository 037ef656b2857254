"""Tokenization through the chat template, with the loss on assistant turns only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedllama.config import DataConfig
from fedllama.data.files import DataError, Example

IGNORE_INDEX = -100


def _with_system(messages: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    if messages[0]["role"] == "system" or not system_prompt:
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _template_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool) -> Any:
    ids: Any = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_example(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_len: int, system_prompt: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels via the chat template; loss only on assistant turns.

    Each assistant turn's tokens are those the template adds between the conversation up to the
    turn (with the generation prompt) and the conversation including it.
    """
    messages = _with_system(messages, system_prompt)
    full = _template_ids(tok, messages, gen=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template_ids(tok, messages[:i], gen=True))
        end = len(_template_ids(tok, messages[: i + 1], gen=False))
        labels[start:end] = full[start:end]
    return full[:max_len], labels[:max_len]


@dataclass
class Encoded:
    """A tokenized example."""

    input_ids: list[int]
    labels: list[int]


def encode_all(
    tok: PreTrainedTokenizerBase, examples: Sequence[Example], cfg: DataConfig
) -> list[Encoded]:
    """Tokenize examples, dropping any whose answer was cut off entirely by ``max_seq_len``."""
    out = []
    for ex in examples:
        ids, labels = encode_example(tok, ex["messages"], cfg.max_seq_len, cfg.system_prompt)
        if any(label != IGNORE_INDEX for label in labels):
            out.append(Encoded(ids, labels))
    if examples and not out:
        raise DataError(
            f"no usable example: every answer lies beyond data.max_seq_len={cfg.max_seq_len} "
            "tokens",
            hint=f"raise data.max_seq_len (e.g. data.max_seq_len={cfg.max_seq_len * 2}) or "
            "shorten the prompts",
        )
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
