"""The config sections that describe a run's model, data, training, strategy, server,
simulation and output (``fedllama.config`` composes them with the privacy sections);
each checks its own values in ``__post_init__`` and names the key it refuses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fedllama.errors import UserError

MODEL_NAMES = ("tiny", "smollm2-135m")
QUANTIZATIONS = ("nf4", "none")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
PARTITIONS = ("institution", "iid", "dirichlet")
DATA_FIELDS = ("instruction", "input", "response", "messages", "institution")
"""The fields an example is read from; ``data.columns`` maps them to a file's own column names."""
LR_SCHEDULES = ("constant", "linear", "cosine")
SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")
COMBINERS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
OVER_BOUND = ("clip", "drop")
FAILED_ROUND = ("retry", "skip", "stop")


class ConfigError(UserError, ValueError):
    """A config key is unknown, mistyped or out of range."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, allowed: Sequence[str]) -> None:
    _require(value in allowed, key, f"got {value!r}, expected one of {', '.join(allowed)}")


@dataclass
class ModelConfig:
    """Base model and its quantization."""

    name: str = "smollm2-135m"
    """``tiny`` (random 2-layer LLaMA, for tests) or ``smollm2-135m`` (embedded, real)."""
    path: str | None = None
    """Local Hugging Face model directory; when set it replaces ``name``."""
    quantization: str = "nf4"
    """``nf4`` (bitsandbytes 4-bit NF4, double quant = QLoRA) or ``none``."""
    compute_dtype: str = "auto"
    """NF4 compute dtype; ``auto`` = bfloat16 on a GPU that supports it, else float32."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu``, ``cuda`` or ``cuda:N``."""
    cache_dir: str = "~/.cache/fedllama"
    """Converted and quantized base models and the demo data are cached here."""
    seed: int = 0
    """Initialisation seed of the ``tiny`` model."""

    def __post_init__(self) -> None:
        if self.path is None:
            _one_of(self.name, "model.name", MODEL_NAMES)
        else:
            _require(bool(self.path.strip()), "model.path", "must be a directory, got ''")
        _one_of(self.quantization, "model.quantization", QUANTIZATIONS)
        _one_of(self.compute_dtype, "model.compute_dtype", COMPUTE_DTYPES)
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "model.device",
            f"got {self.device!r}, expected auto, cpu, cuda or cuda:N",
        )


TARGET_PRESETS: dict[str, list[str] | str] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
}
"""``lora.target_modules`` presets -> what ``peft.LoraConfig`` gets. LLaMA, Mistral, Qwen2 and
Llama 4's attention and shared expert share these names (docs/adapters.md); ``all-linear`` is
peft's own: every linear layer but the output head (and ``NOT_LINEAR``: Llama 4's router)."""

NOT_LINEAR = ["router"]
"""``nn.Linear`` subclasses whose forward is not a linear map, which peft's LoRA layer cannot
wrap: Llama 4's router returns its top-k scores and its logits. ``all-linear`` leaves them out
(peft's ``exclude_modules``); ``lora.target_parameters=[feed_forward.router.weight]`` adapts
the router's weight instead."""

EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
"""``lora.target_parameters=experts``: Llama 4 text's fused routed experts (parameters of
``Llama4TextExperts``, not linear layers), adapted by peft's ``target_parameters``."""


ADAPTER_KINDS: dict[str, str] = {
    "lora": "LORA",
    "llama-adapter": "ADAPTION_PROMPT",
    "ia3": "IA3",
    "prompt-tuning": "PROMPT_TUNING",
    "prefix-tuning": "PREFIX_TUNING",
}
"""``adapter.kind`` -> the ``peft.PeftType`` that builds it (docs/adapters.md)."""


@dataclass
class AdapterConfig:
    """Which kind of adapter clients train, each built by peft.

    ``lora`` (with ``lora.*``: DoRA, rsLoRA, presets, mixed ranks) is the default. The others
    are *dense*: one fixed-shape state on every client, merged by example-weighted averaging
    (FedAvg) only, with every client at the same shape.

    - ``llama-adapter``: LLaMA-Adapter (Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of
      Large Language Models with Zero-initialized Attention", ICLR 2024), peft's adaption
      prompt: ``adapter_len`` learned prompt vectors in each of the top ``adapter_layers``
      attention layers behind a zero-initialised gate (LLaMA and Mistral models only).
    - ``ia3``: IA³ (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
      than In-Context Learning", NeurIPS 2022): learned rescaling vectors on keys, values and
      the MLP's down projection (peft's targets for the architecture).
    - ``prompt-tuning`` (Lester et al., EMNLP 2021): ``num_virtual_tokens`` learned input
      embeddings in front of every example.
    - ``prefix-tuning`` (Li & Liang, ACL 2021): ``num_virtual_tokens`` learned key/value
      prefixes in every layer (peft's default, without the reparametrising MLP).
    """

    kind: str = "lora"
    """``lora``, ``llama-adapter``, ``ia3``, ``prompt-tuning`` or ``prefix-tuning``."""
    num_virtual_tokens: int = 16
    """``prompt-tuning`` and ``prefix-tuning``: virtual tokens (peft's ``num_virtual_tokens``)."""
    adapter_len: int = 10
    """``llama-adapter``: prompt vectors per adapted layer (peft's ``adapter_len``)."""
    adapter_layers: int = 0
    """``llama-adapter``: the top layers adapted (peft's ``adapter_layers``); 0 = all layers."""

    @property
    def dense(self) -> bool:
        """Any kind but LoRA: a fixed-shape state, merged by FedAvg."""
        return self.kind != "lora"

    def peft_kwargs(self, num_layers: int) -> dict[str, Any]:
        """What ``peft.get_peft_config`` takes for a dense kind (``peft_type`` included), for a
        model of ``num_layers`` layers (``llama-adapter`` with ``adapter_layers=0``)."""
        kwargs: dict[str, Any] = {"peft_type": ADAPTER_KINDS[self.kind]}
        if self.kind == "llama-adapter":
            kwargs.update(
                adapter_len=self.adapter_len, adapter_layers=self.adapter_layers or num_layers
            )
        elif self.kind in ("prompt-tuning", "prefix-tuning"):
            kwargs["num_virtual_tokens"] = self.num_virtual_tokens
        return kwargs

    def __post_init__(self) -> None:
        _one_of(self.kind, "adapter.kind", tuple(ADAPTER_KINDS))
        _require(
            self.num_virtual_tokens >= 1,
            "adapter.num_virtual_tokens",
            f"must be >= 1, got {self.num_virtual_tokens}",
        )
        _require(
            self.adapter_len >= 1, "adapter.adapter_len", f"must be >= 1, got {self.adapter_len}"
        )
        _require(
            self.adapter_layers >= 0,
            "adapter.adapter_layers",
            f"must be >= 0 (0 = every layer), got {self.adapter_layers}",
        )


@dataclass
class LoraConfig:
    """LoRA settings, named exactly as ``peft.LoraConfig`` names them.

    ``use_dora``: DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024)
    trains a magnitude vector per adapted layer next to A and B. ``use_rslora``: rsLoRA
    (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023)
    scales by lora_alpha/√r instead of lora_alpha/r. Both are built by peft.
    """

    r: int = 8
    """Global LoRA rank (and every client's, unless ``client_ranks`` says otherwise)."""
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """A preset (``attention``, ``mlp``, ``all-linear``: ``TARGET_PRESETS``) or module names."""
    target_parameters: str | list[str] = field(default_factory=list)
    """Parameters, not modules, to put LoRA on (peft's ``target_parameters``, peft >= 0.17):
    the fused routed experts of a mixture-of-experts model, or its router's weight. ``experts``
    (Llama 4 text's ``EXPERT_PARAMETERS``) or names matched as suffixes of the base's parameter
    names; empty: none. peft keeps each expert's ``r`` rank slots in one factor (``r`` x experts
    rows), so it trains at one rank on every client, without DoRA, merged by ``fedavg``."""
    bias: str = "none"
    use_dora: bool = False
    """DoRA: a trained magnitude vector per adapted layer (peft's ``lora_magnitude_vector``)."""
    use_rslora: bool = False
    """rsLoRA: peft's scale is lora_alpha/√r instead of lora_alpha/r."""
    client_ranks: list[int] = field(default_factory=list)
    """Simulation only: client p trains at rank ``client_ranks[p % len]`` (each <= r). A
    deployment's SuperNode sets its rank with ``--node-config 'lora-rank=16'``. Not a peft key."""

    def modules(self) -> list[str] | str:
        """``target_modules`` as peft takes it: a preset resolved, or the names as given."""
        if isinstance(self.target_modules, str):
            preset = TARGET_PRESETS[self.target_modules]
            return preset if isinstance(preset, str) else list(preset)
        return list(self.target_modules)

    def parameters(self) -> list[str]:
        """``target_parameters`` as a list: the ``experts`` preset resolved."""
        if isinstance(self.target_parameters, str):
            return list(EXPERT_PARAMETERS)
        return list(self.target_parameters)

    def peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig`` (presets resolved)."""
        kwargs = asdict(self)
        del kwargs["client_ranks"]
        kwargs["target_modules"] = self.modules()
        kwargs["target_parameters"] = self.parameters() or None
        if kwargs["target_modules"] == "all-linear":
            kwargs["exclude_modules"] = list(NOT_LINEAR)
        return kwargs

    def scale(self) -> float:
        """peft's scale of the adapter: lora_alpha/r, or lora_alpha/√r under rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def at_rank(self, rank: int) -> LoraConfig:
        """This config for a client of another rank, with ``lora_alpha`` scaled so that peft's
        scale (:meth:`scale`) is the same at every rank: by rank/r, or by √(rank/r) under rsLoRA.

        Keeping the scale equal across ranks makes rank slot i mean the same on every client, so
        slots can be averaged across ranks.
        """
        ratio = rank / self.r
        alpha = self.lora_alpha * (ratio**0.5 if self.use_rslora else ratio)
        return replace(self, r=rank, lora_alpha=alpha, client_ranks=[])

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _require(self.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _require(
            0.0 <= self.lora_dropout < 1.0,
            "lora.lora_dropout",
            f"must be in [0, 1), got {self.lora_dropout}",
        )
        self._check_target_modules()
        self._check_target_parameters()
        _one_of(self.bias, "lora.bias", ("none",))
        for rank in self.client_ranks:
            _require(
                1 <= rank <= self.r,
                "lora.client_ranks",
                f"each rank must be in 1..lora.r={self.r}, got {rank}",
            )

    def _check_target_modules(self) -> None:
        presets = ", ".join(TARGET_PRESETS)
        if isinstance(self.target_modules, str):
            _one_of(self.target_modules, "lora.target_modules", tuple(TARGET_PRESETS))
            return
        _require(
            len(self.target_modules) > 0,
            "lora.target_modules",
            f"must not be empty; give module names or one of {presets}",
        )
        for name in self.target_modules:
            _require(
                name not in TARGET_PRESETS,
                "lora.target_modules",
                f"{name!r} is a preset: write lora.target_modules={name}, not a list",
            )
            _require(bool(name.strip()), "lora.target_modules", "a module name is empty")

    def _check_target_parameters(self) -> None:
        key = "lora.target_parameters"
        if isinstance(self.target_parameters, str):
            _one_of(self.target_parameters, key, ("experts",))
        elif not self.target_parameters:
            return
        for name in self.parameters():
            _require(bool(name.strip()), key, "a parameter name is empty")
        why = "peft's expert LoRA keeps every expert's rank slots in one factor"
        _require(
            len(set(self.client_ranks) | {self.r}) == 1,
            "lora.client_ranks",
            f"mixed ranks do not apply with {key}: {why} (remove lora.client_ranks)",
        )
        _require(not self.use_dora, "lora.use_dora", f"peft has no DoRA for {key} (set it false)")


@dataclass
class CanaryConfig:
    """Canaries (Carlini et al., "The Secret Sharer", USENIX Security 2019): random secrets put
    into one client's training data to measure what the global adapter memorises
    (``fedllama/data/canaries.py``, ``fedllama canaries``; docs/leakage.md)."""

    count: int = 0
    """Candidate canaries (0: none). Each is inserted with probability 1/2 (a seeded coin); the
    others are held out: the audit's non-members."""
    repeats: int = 1
    """Times each inserted canary appears in the client's training data."""
    client: int = 0
    """The client (partition id) whose training data holds them."""
    references: int = 1000
    """Random secrets of the same format scored against each canary (its exposure's resolution:
    at most log2(references + 1) bits)."""
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.count >= 0, "data.canary.count", f"must be >= 0, got {self.count}")
        _require(self.repeats >= 1, "data.canary.repeats", f"must be >= 1, got {self.repeats}")
        _require(self.client >= 0, "data.canary.client", f"must be >= 0, got {self.client}")
        _require(
            self.references >= 10,
            "data.canary.references",
            f"must be >= 10, got {self.references}",
        )


@dataclass
class DataConfig:
    """Where examples come from and how they are split over clients."""

    source: str = "demo"
    """``demo`` (embedded federation), a local .jsonl/.csv/.parquet file, a directory saved by
    ``datasets``' ``save_to_disk``, or a directory of those."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field (one of ``DATA_FIELDS``) -> the column that holds it in the user's data, e.g.
    ``{instruction: prompt, response: completion}``. A field not named here is read from the
    column of its own name (``response`` also from ``output``)."""
    partition: str = "institution"
    """``institution`` (one client per institution), ``iid`` or ``dirichlet``."""
    dirichlet_alpha: float = 0.5
    max_examples_per_institution: int = 600
    """Cap on each demo institution's examples (ICD-10-CM alone has 46k codes)."""
    eval_fraction: float = 0.1
    """Share of each client's examples held out for its own evaluation."""
    global_eval_size: int = 64
    """Examples in the server's held-out global eval split (drawn from every institution)."""
    max_seq_len: int = 128
    system_prompt: str = "You are a helpful assistant."
    seed: int = 0
    canary: CanaryConfig = field(default_factory=CanaryConfig)

    def __post_init__(self) -> None:
        _one_of(self.partition, "data.partition", PARTITIONS)
        _require(
            self.dirichlet_alpha > 0,
            "data.dirichlet_alpha",
            f"must be > 0, got {self.dirichlet_alpha}",
        )
        _require(
            0.0 < self.eval_fraction < 1.0,
            "data.eval_fraction",
            f"must be in (0, 1), got {self.eval_fraction}",
        )
        _require(
            self.max_examples_per_institution >= 10,
            "data.max_examples_per_institution",
            f"must be >= 10, got {self.max_examples_per_institution}",
        )
        _require(
            self.global_eval_size >= 1,
            "data.global_eval_size",
            f"must be >= 1, got {self.global_eval_size}",
        )
        _require(
            self.max_seq_len >= 16, "data.max_seq_len", f"must be >= 16, got {self.max_seq_len}"
        )
        self._check_columns()

    def _check_columns(self) -> None:
        for key, column in self.columns.items():
            _require(
                key in DATA_FIELDS,
                f"data.columns.{key}",
                f"unknown field; expected one of {', '.join(DATA_FIELDS)}",
            )
            _require(bool(column.strip()), f"data.columns.{key}", "must name a column, got ''")
        by_column: dict[str, list[str]] = {}
        for key, column in self.columns.items():
            by_column.setdefault(column, []).append(key)
        for column, (first, *others) in by_column.items():
            _require(
                not others,
                f"data.columns.{others[0] if others else first}",
                f"column {column!r} is already mapped to data.columns.{first}; "
                "each field needs its own column",
            )


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_steps: int = 8
    """Optimizer steps per round (each of ``grad_accum`` micro-batches)."""
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    fedprox_mu: float = 0.0
    """FedProx proximal term (mu/2)·||w - w_global||²; 0 = plain local SGD."""
    eval_batch_size: int = 8
    client_eval_size: int = 16
    """Examples of its own eval split a client scores after training (0 = skip)."""
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("local_steps", "batch_size", "grad_accum", "eval_batch_size"):
            value = getattr(self, key)
            _require(value >= 1, f"train.{key}", f"must be >= 1, got {value}")
        _require(
            self.client_eval_size >= 0,
            "train.client_eval_size",
            f"must be >= 0, got {self.client_eval_size}",
        )
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _one_of(self.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
        _require(
            self.warmup_steps >= 0,
            "train.warmup_steps",
            f"must be >= 0, got {self.warmup_steps}",
        )
        for key in ("weight_decay", "max_grad_norm", "fedprox_mu"):
            value = getattr(self, key)
            _require(value >= 0, f"train.{key}", f"must be >= 0, got {value}")


@dataclass
class StrategyConfig:
    """Merge strategy (see ``strategies/``); the name is checked against the registry."""

    name: str = "fedavg"
    weighting: str = "examples"
    """How clients' deltas are weighed in the merge: ``examples`` (by training examples, as in
    FedAvg, McMahan et al. 2017) or ``uniform`` (every client 1, as DP-FedAvg weighs them; for
    when one client's data would dominate, or to compare a run with its DP counterpart).
    Under DP every client weighs 1 whatever this says."""
    flexlora_form: str = "dense"
    """``flexlora`` only: ``dense`` (summable; clients send out×in products) or ``factored``
    (trusted server; clients send their factors, the server never forms an out×in matrix)."""

    def __post_init__(self) -> None:
        _one_of(self.weighting, "strategy.weighting", ("examples", "uniform"))
        _one_of(self.flexlora_form, "strategy.flexlora_form", ("dense", "factored"))


@dataclass
class ServerConfig:
    """Server rounds, optimizer and tolerance to bad replies."""

    rounds: int = 3
    optimizer: str = "sgd"
    """``sgd``, ``avgm`` (FedAvgM), ``adam`` (FedAdam) or ``yogi`` (FedYogi)."""
    lr: float = 1.0
    """Server learning rate on the aggregated delta (sgd with lr 1 = plain FedAvg)."""
    momentum: float = 0.9
    """``avgm``'s momentum β."""
    beta1: float = 0.9
    """``adam``/``yogi`` first-moment decay."""
    beta2: float = 0.99
    """``adam``/``yogi`` second-moment decay."""
    tau: float = 1e-3
    """``adam``/``yogi`` adaptivity (ε); v starts at τ²."""
    fraction_train: float = 1.0
    min_replies: int = 1
    """Good replies a round needs; fewer and the run stops, the last round kept."""
    timeout_s: float = 3600.0
    evaluate: bool = True
    """Evaluate the global adapter on the global eval split after every round."""
    max_examples: int = 0
    """> 0: a reply declaring more examples than this is dropped (its weight would dominate the
    average); 0: no cap (the declared count is still checked against the encoded weight)."""
    reject_loss_factor: float = 0.0
    """> 1: a round whose global adapter evaluates above this factor times the previous
    round's eval loss is rejected (the previous adapter is kept and the run goes on); 0: off.
    A non-finite adapter or eval loss is always rejected."""
    failed_round: str = "retry"
    """A round that produces no delta (fewer than ``min_replies`` good replies, secure
    aggregation aborted, a sum that fails its checks): ``retry`` it without the nodes the
    failure names, up to ``round_retries`` times, then skip it; ``skip`` it (the global
    adapter stays, the run goes on); or ``stop`` the run (a resume redoes the round)."""
    round_retries: int = 1
    """``failed_round=retry``: attempts after the first before the round is skipped."""

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "server.rounds", f"must be >= 1, got {self.rounds}")
        _require(
            self.max_examples >= 0,
            "server.max_examples",
            f"must be >= 0 (0 = no cap), got {self.max_examples}",
        )
        _require(
            self.reject_loss_factor == 0 or self.reject_loss_factor > 1,
            "server.reject_loss_factor",
            f"must be 0 (off) or > 1, got {self.reject_loss_factor}",
        )
        _one_of(self.optimizer, "server.optimizer", SERVER_OPTIMIZERS)
        _one_of(self.failed_round, "server.failed_round", FAILED_ROUND)
        _require(
            self.round_retries >= 0,
            "server.round_retries",
            f"must be >= 0, got {self.round_retries}",
        )
        _require(self.lr > 0, "server.lr", f"must be > 0, got {self.lr}")
        for key in ("momentum", "beta1", "beta2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"server.{key}", f"must be in [0, 1), got {value}")
        _require(self.tau > 0, "server.tau", f"must be > 0, got {self.tau}")
        _require(
            0.0 < self.fraction_train <= 1.0,
            "server.fraction_train",
            f"must be in (0, 1], got {self.fraction_train}",
        )
        _require(
            self.min_replies >= 1, "server.min_replies", f"must be >= 1, got {self.min_replies}"
        )
        _require(self.timeout_s > 0, "server.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass
class SimulationConfig:
    """Flower simulation engine (Ray) settings."""

    num_clients: int = 4
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str = ""
    """An existing Ray cluster to run the clients on: its head's ``HOST:PORT`` (what
    ``ray start --head`` prints) or ``auto``; empty starts a Ray instance on this machine.
    Every node of the cluster needs this repository's environment and the model cache."""

    def __post_init__(self) -> None:
        address = self.ray_address
        _require(
            not address
            or address == "auto"
            or (":" in address and address.rsplit(":", 1)[1].isdigit() and " " not in address),
            "simulation.ray_address",
            f"expected HOST:PORT of a Ray head (or auto), got {address!r}",
        )
        _require(
            1 <= self.num_clients <= 10_000,
            "simulation.num_clients",
            f"must be in [1, 10000], got {self.num_clients}",
        )
        _require(
            self.client_cpus > 0,
            "simulation.client_cpus",
            f"must be > 0, got {self.client_cpus}",
        )
        _require(
            self.client_gpus >= 0,
            "simulation.client_gpus",
            f"must be >= 0, got {self.client_gpus}",
        )


@dataclass
class OutputConfig:
    """Where round adapters, metrics and plots go."""

    dir: str = "runs/demo"
    plot: bool = True
    tensorboard: bool = False
    """Write each round's scalars to ``<dir>/tensorboard`` (needs ``fedllama[tensorboard]``)."""


WIRE_CODECS = ("none", "strip", "fp16", "int8", "ternary", "topk")
WIRE_DOWNLINKS = ("none", "fp16")
LOSSLESS_CODECS = ("none", "strip")


@dataclass
class WireConfig:
    """How a client's update travels (``fedllama/wire/codecs.py``; docs/wire.md)."""

    codec: str = "none"
    """``none`` (float32 at the global rank), ``strip`` (float32 at the client's own rank),
    ``fp16``, ``int8``, ``ternary`` (all stripped first) or ``topk`` (with error feedback)."""
    topk_fraction: float = 0.05
    """``topk``: the share of each tensor's entries sent (the largest magnitudes)."""
    downlink: str = "none"
    """How the global state travels to clients: ``none`` (float32) or ``fp16`` (half the
    bytes; a tensor beyond float16's range stays float32). Each client trains from, and sends
    its delta against, the view it received, so the server's sum stays exact."""

    def __post_init__(self) -> None:
        _one_of(self.codec, "wire.codec", WIRE_CODECS)
        _one_of(self.downlink, "wire.downlink", WIRE_DOWNLINKS)
        _require(
            0.0 < self.topk_fraction <= 1.0,
            "wire.topk_fraction",
            f"must be in (0, 1], got {self.topk_fraction}",
        )
