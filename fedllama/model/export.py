"""Export a round's global model: as a PEFT adapter directory, or merged into its base.

Either is written under a temporary name next to ``out`` and renamed when complete, so ``out``
never holds half an export. The merged model is the base in float32 with the round's adapter
(the residual of the exact rules included: it is folded into that adapter) merged in, then cast
to the chosen dtype; the 4-bit base a run trains on is never what is merged into.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllama.model import adapters
from fedllama.model.serve import RoundSource, ServeError, with_adapter

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``--dtype`` names and the dtype an export's weights are written in."""


def export_adapter(
    source: RoundSource, out: Path, dtype: str = "fp32", force: bool = False
) -> Path:
    """Write ``out`` as a PEFT adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, out)`` loads.

    Raises:
        ServeError: ``out`` is not empty (and not ``force``), or would replace the round itself.
    """
    torch_dtype = _dtype(dtype)
    _check_out(out, force, source)
    state, _ = adapters.load_adapter(source.adapter_dir)

    def write(tmp: Path) -> None:
        shutil.copyfile(source.adapter_dir / adapters.ADAPTER_CONFIG, tmp / adapters.ADAPTER_CONFIG)
        weights = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}
        save_file(weights, str(tmp / adapters.ADAPTER_WEIGHTS))

    return _publish(out, force, write)


def export_merged(source: RoundSource, out: Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write ``out`` as a full model directory (weights, config, tokenizer with its chat
    template) that ``AutoModelForCausalLM.from_pretrained(out)`` loads: the base with the
    round's adapter merged in.

    Raises:
        ServeError: the base is missing, the adapter does not fit it, or ``out`` is not empty
            (and not ``force``) or would replace the round or the base.
    """
    torch_dtype = _dtype(dtype)
    _check_mergeable(source)
    base_dir = source.base_dir()
    _check_out(out, force, source, base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = with_adapter(base, source).merge_and_unload()  # W0 + s·B A, in float32
    merged = merged.to(torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _publish(out, force, write)


MERGEABLE = ("LORA", "IA3")
"""peft types whose adapter folds into the base's weights (``merge_and_unload``)."""


def _check_mergeable(source: RoundSource) -> None:
    """Refuse a round whose adapter acts on activations (LLaMA-Adapter's gated prompts,
    prompt and prefix tuning's virtual tokens): no weight of the base can hold it."""
    config = json.loads((source.adapter_dir / adapters.ADAPTER_CONFIG).read_text())
    kind = str(config.get("peft_type", "LORA"))
    if kind not in MERGEABLE:
        raise ServeError(
            f"a {kind} adapter cannot be merged into its base: it adds prompts or prefixes to "
            "the activations, which no weight of the base holds; export it without --merged "
            "(a PEFT adapter that PeftModel.from_pretrained loads)"
        )


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ServeError(f"dtype: got {name!r}, expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_out(out: Path, force: bool, source: RoundSource, *keep: Path) -> None:
    """Refuse a non-empty ``out`` without ``force``, a file, and, even with ``force``, an ``out``
    that is (or holds) the round directory or the base it needs."""
    if out.exists() and not out.is_dir():
        raise ServeError(f"{out} exists and is not a directory")
    target = out.resolve()
    for path in (source.adapter_dir, *keep):
        resolved = path.resolve()
        if target == resolved or target in resolved.parents:
            raise ServeError(f"{out} holds {path}; export to another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ServeError(f"{out} is not empty; pass --force to replace it")


def _publish(out: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temporary directory next to ``out``, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by a crashed export of this process id
        shutil.rmtree(tmp)
    tmp.mkdir()  # not mkdtemp: the export gets the user's umask, not 0700
    try:
        write(tmp)
        if out.is_dir():
            if any(out.iterdir()) and not force:  # filled while we wrote
                raise ServeError(f"{out} is not empty; pass --force to replace it")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
