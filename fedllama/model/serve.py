"""A round's global model for inference: open a round directory, load it, answer prompts.

A round directory (``round-NNN/``, see ``fedllama.server.checkpoint``) holds a PEFT adapter
whose ``adapter_config.json`` names the local base model directory. For the exact rules (FLoRA,
FedEx-LoRA) the frozen residual is already folded into that adapter at peft scale 1
(``merge.with_residual``), so the adapter on its base is the whole global model the server
evaluates; nothing here needs to know the strategy.

The base is loaded as the run's server loads it for evaluation (``model.quantization`` and
``model.compute_dtype`` from the run's ``config.yaml``); without a run config, unquantized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedllama.config import Config, ConfigError, ModelConfig, from_yaml
from fedllama.model import adapters
from fedllama.model.base import load_base, load_tokenizer

RUN_CONFIG = "config.yaml"
"""The run directory's resolved config (``fedllama.server.checkpoint.CONFIG``; the model layer
may not import the server's)."""

EXIT = "/exit"
"""The line that ends a chat (as does the end of its input)."""

Message = dict[str, str]


class ServeError(ValueError):
    """A round directory, its base model or an output directory is not what a command needs."""


@dataclass(frozen=True)
class RoundSource:
    """A round directory read for inference or export.

    Attributes:
        adapter_dir: the directory holding the PEFT adapter.
        base_name: ``base_model_name_or_path`` from its ``adapter_config.json``.
        run_config: the run's resolved config, when the round's run directory has one.
    """

    adapter_dir: Path
    base_name: str
    run_config: Config | None

    @property
    def system_prompt(self) -> str:
        """The run's ``data.system_prompt`` (what training put in every prompt); '' without a
        run config."""
        return self.run_config.data.system_prompt if self.run_config else ""

    def base_dir(self) -> Path:
        """The local base model directory the adapter names.

        Raises:
            ServeError: it is not a local Hugging Face model directory.
        """
        path = Path(self.base_name).expanduser()
        if not (path / "config.json").is_file():
            raise ServeError(
                f"the base model {self.base_name!r} named in "
                f"{self.adapter_dir / adapters.ADAPTER_CONFIG} is not a local model directory "
                "(no config.json there); nothing is fetched from a hub"
            )
        return path.resolve()


def open_round(directory: str | Path) -> RoundSource:
    """Read a round directory (or any PEFT adapter directory fedllama wrote).

    The run config is looked for in the directory itself, then in its run directory (the
    parent; the grandparent for a ``rank-RR/`` adapter).

    Raises:
        ServeError: the directory holds no PEFT adapter, or its config or the run's is unreadable.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ServeError(f"{d} is not a round directory (no such directory)")
    for name in (adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            raise ServeError(f"{d} is not a round directory: {name} is missing")
    try:
        base_name = json.loads((d / adapters.ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as err:
        raise ServeError(
            f"{d / adapters.ADAPTER_CONFIG} names no base model "
            f"(base_model_name_or_path): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(base_name, str) or not base_name:
        raise ServeError(f"{d / adapters.ADAPTER_CONFIG} names no base model")
    return RoundSource(d, base_name, _run_config(d))


def _run_config(directory: Path) -> Config | None:
    places = [directory, directory.parent]
    if directory.name.startswith("rank-"):
        places.append(directory.parent.parent)
    for place in places:
        path = place / RUN_CONFIG
        if path.is_file():
            try:
                return from_yaml(path.read_text())
            except ConfigError as err:
                raise ServeError(f"{path}: not a fedllama run config: {err}") from None
    return None


def model_config(source: RoundSource, device: str | None = None) -> ModelConfig:
    """How to load the base: the run's model settings (quantization, compute dtype, device,
    cache) with the adapter's base directory; ``device`` overrides the run's."""
    base = str(source.base_dir())
    if source.run_config is None:
        return ModelConfig(path=base, quantization="none", device=device or "auto")
    run = source.run_config.model
    return replace(run, path=base, device=device or run.device)


def with_adapter(base: PreTrainedModel, source: RoundSource) -> Any:
    """``PeftModel.from_pretrained(base, adapter_dir)``, checked strictly: peft loads with
    ``strict=False`` and would leave a module whose key it does not find at its init."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(base, str(source.adapter_dir))
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ServeError(
            f"the adapter in {source.adapter_dir} does not fit its base {source.base_name}: {first}"
        ) from None
    saved, _ = adapters.load_adapter(source.adapter_dir)
    adapters.check_compatible(
        adapters.get_adapter_state(peft_model), saved, str(source.adapter_dir)
    )
    return peft_model.eval()


def load_round_model(
    source: RoundSource, device: str | None = None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The round's global model (base + adapter, in eval mode) and the base's tokenizer.

    Raises:
        ServeError: the base is missing or the adapter does not fit it.
        fedllama.model.ModelError: the base cannot be loaded or its tokenizer has no chat template.
    """
    cfg = model_config(source, device)
    tokenizer = load_tokenizer(source.base_dir())
    return with_adapter(load_base(cfg), source), tokenizer


def conversation(system_prompt: str, history: list[Message]) -> list[Message]:
    """The messages the chat template renders: the system prompt (when there is one) first."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, *history]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> torch.Tensor:
    """The chat template's token ids for ``messages`` with the assistant's turn opened: (1, T)."""
    ids: Any = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def answer(
    model: Any, tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_new_tokens: int
) -> str:
    """The model's greedy answer to ``messages`` (the new tokens only, special tokens dropped)."""
    ids = prompt_ids(tokenizer, messages).to(model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def chat(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    lines: Iterable[str],
    out: TextIO,
    system_prompt: str = "",
    max_new_tokens: int = 128,
) -> list[Message]:
    """Answer each line of ``lines`` with the whole conversation so far in the chat template;
    stop at :data:`EXIT` or the end of ``lines``. Blank lines are skipped.

    Returns:
        The conversation (user and assistant turns, no system prompt).
    """
    history: list[Message] = []
    for line in lines:
        text = line.strip()
        if text == EXIT:
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = answer(model, tokenizer, conversation(system_prompt, history), max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        print(reply, file=out, flush=True)
    return history
