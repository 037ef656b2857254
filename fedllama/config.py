"""One config schema for every fedllama run, loaded with OmegaConf.

Precedence: dataclass defaults <- YAML file <- ``key=value`` overrides. The merged config is
turned into typed dataclasses (``OmegaConf.to_object``); everything downstream takes those, never
a ``DictConfig``. Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the
key and what is allowed, before any model or data is touched.

Key names follow the library they are passed to, so ``peft.LoraConfig(**cfg.lora.peft_kwargs())``
works unchanged (``peft_kwargs`` only drops ``client_ranks``, which is ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


class ConfigError(ValueError):
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


@dataclass
class LoraConfig:
    """LoRA settings, named exactly as ``peft.LoraConfig`` names them."""

    r: int = 8
    """Global LoRA rank (and every client's, unless ``client_ranks`` says otherwise)."""
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    bias: str = "none"
    client_ranks: list[int] = field(default_factory=list)
    """Simulation only: client p trains at rank ``client_ranks[p % len]`` (each <= r). A
    deployment's SuperNode sets its rank with ``--node-config 'lora-rank=16'``. Not a peft key."""

    def peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig``."""
        kwargs = asdict(self)
        del kwargs["client_ranks"]
        return kwargs

    def at_rank(self, rank: int) -> LoraConfig:
        """This config for a client of another rank, with ``lora_alpha`` scaled by rank/r.

        Keeping peft's scale lora_alpha/r equal across ranks makes rank slot i mean the same on
        every client, so slots can be averaged across ranks.
        """
        alpha = self.lora_alpha * rank / self.r
        return replace(self, r=rank, lora_alpha=alpha, client_ranks=[])

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _require(self.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _require(
            0.0 <= self.lora_dropout < 1.0,
            "lora.lora_dropout",
            f"must be in [0, 1), got {self.lora_dropout}",
        )
        _require(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")
        _one_of(self.bias, "lora.bias", ("none",))
        for rank in self.client_ranks:
            _require(
                1 <= rank <= self.r,
                "lora.client_ranks",
                f"each rank must be in 1..lora.r={self.r}, got {rank}",
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
    flexlora_form: str = "dense"
    """``flexlora`` only: ``dense`` (summable; clients send out×in products) or ``factored``
    (trusted server; clients send their factors, the server never forms an out×in matrix)."""

    def __post_init__(self) -> None:
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
class RobustConfig:
    """Bounded influence of one client on the plain path (docs/robustness.md)."""

    combiner: str = "mean"
    """``mean`` (the strategy's own weighted mean), ``median`` (coordinate-wise),
    ``trimmed_mean``, ``krum`` or ``multi_krum``; all but ``mean`` weigh every client equally
    and need each client's update (refused with secure aggregation and DP)."""
    trim: float = 0.1
    """``trimmed_mean``: β, the share of the values cut at each end of every coordinate."""
    byzantine: int = 1
    """``krum`` / ``multi_krum``: f, the Byzantine clients tolerated; a round needs n ≥ 2f + 3."""
    krum_select: int = 0
    """``multi_krum``: m, the lowest-scoring updates averaged; 0: n − f."""
    norm_bound: float = 0.0
    """> 0: a fixed bound on each update's L2 norm (all of its tensors as one vector)."""
    norm_bound_median: float = 0.0
    """> 0: bound each update's norm by this factor times the median norm of the round's
    updates (at least 1); with ``norm_bound`` too, the smaller bound applies."""
    over_bound: str = "clip"
    """What happens to an update over the bound: ``clip`` (scaled down to it) or ``drop``."""

    def __post_init__(self) -> None:
        _one_of(self.combiner, "robust.combiner", COMBINERS)
        _one_of(self.over_bound, "robust.over_bound", OVER_BOUND)
        _require(0.0 <= self.trim < 0.5, "robust.trim", f"must be in [0, 0.5), got {self.trim}")
        _require(self.byzantine >= 0, "robust.byzantine", f"must be >= 0, got {self.byzantine}")
        _require(
            self.krum_select >= 0, "robust.krum_select", f"must be >= 0, got {self.krum_select}"
        )
        _require(
            self.norm_bound >= 0,
            "robust.norm_bound",
            f"must be >= 0 (0: off), got {self.norm_bound}",
        )
        _require(
            self.norm_bound_median == 0 or self.norm_bound_median >= 1,
            "robust.norm_bound_median",
            f"must be 0 (off) or >= 1 (a multiple of the median norm), got "
            f"{self.norm_bound_median}",
        )

    @property
    def bounded(self) -> bool:
        """Whether updates' norms are bounded."""
        return self.norm_bound > 0 or self.norm_bound_median > 0

    @property
    def enabled(self) -> bool:
        """Whether the server looks at each update (a bound or a robust combiner)."""
        return self.bounded or self.combiner != "mean"


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+, Bell et al., CCS 2020): the server learns only the sum."""

    enabled: bool = False
    threshold: float = 0.6
    """Share of a node's k + 1 shares (its neighbours and itself) that rebuild one of its
    secrets: t = max(2, ⌈threshold·(k + 1)⌉). Above 0.5, so no two disjoint sets of neighbours
    can each rebuild a secret; each neighbourhood tolerates k + 1 - t dropouts."""
    num_neighbours: int = 0
    """k, neighbours per node in the random ring; 0 = 2·⌈log2 N⌉. Rounded up to even, capped at
    N - 1 (then every node neighbours every other, as in SecAgg)."""
    clip_range: float = 1.0e6
    """C: encoded values are clipped to [-C, C] (and counted) before fixed-point encoding.
    Encodings carry weights (example counts) and weighted deltas, so C must exceed both."""
    quantization_bits: int = 48
    """Fixed-point bits per value, sign included: step C / (2^(bits-1) - 1); the 64-bit sum
    holds up to ≈ 2^(64-bits) clients."""
    timeout_s: float = 600.0
    """How long each key/share/unmask stage waits for replies (training waits server.timeout_s)."""
    roster: str = ""
    """Path of the federation's SuperNode public keys (one OpenSSH line each): every node's
    round keys must be signed by a distinct one of them, or the node is dropped at the key
    stage; empty: keys are not signed (a semi-honest server is assumed)."""

    def __post_init__(self) -> None:
        _require(
            0.5 < self.threshold <= 1.0,
            "secagg.threshold",
            f"must be in (0.5, 1], got {self.threshold}",
        )
        _require(
            self.num_neighbours >= 0,
            "secagg.num_neighbours",
            f"must be >= 0 (0 = 2·ceil(log2 N)), got {self.num_neighbours}",
        )
        _require(self.clip_range > 0, "secagg.clip_range", f"must be > 0, got {self.clip_range}")
        _require(
            16 <= self.quantization_bits <= 53,
            "secagg.quantization_bits",
            f"must be in 16..53 (float64 holds 53-bit integers), got {self.quantization_bits}",
        )
        _require(self.timeout_s > 0, "secagg.timeout_s", f"must be > 0, got {self.timeout_s}")

    @property
    def max_clients(self) -> int:
        """Most clients whose fixed-point sum fits in 64 bits."""
        return ((1 << 63) - 1) // ((1 << (self.quantization_bits - 1)) - 1)


DP_PLACEMENTS = ("central", "distributed", "local")
DP_ACCOUNTANTS = ("rdp", "pld")
DP_SAMPLING = ("poisson", "fixed", "all")


@dataclass
class DpConfig:
    """Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018).

    Every sampled client clips its whole update (every tensor it sends, as one vector) to L2
    norm ``clip_norm`` C and weighs it 1; the released sum carries Gaussian noise of standard
    deviation z·C per coordinate and is divided by the expected number of clients (the fixed
    denominator). ε at ``delta`` comes from Google's dp-accounting (docs/privacy.md).
    """

    enabled: bool = False
    clip_norm: float = 1.0
    """C: each client's update (as one vector) is clipped to this L2 norm."""
    noise_multiplier: float = 0.0
    """z: noise standard deviation z·C on the sum. Give z or ``target_epsilon``, not both."""
    target_epsilon: float = 0.0
    """> 0: calibrate z before the run so that ε after ``server.rounds`` rounds is at most this;
    a round that would exceed it (after ``server.rounds`` is raised) is not run."""
    delta: float = 1.0e-5
    placement: str = "central"
    """``central``: the server adds N(0, (zC)²) to the sum; ``distributed``: under secure
    aggregation each client adds its share of discrete Gaussian noise in the integers, so the
    server never holds a noiseless sum (Kairouz et al., ICML 2021); ``local``: each client adds
    the whole noise to its own clipped update (a comparison point: N times the variance)."""
    accountant: str = "rdp"
    """``rdp`` (Rényi DP, Mironov 2017) or ``pld`` (privacy loss distributions)."""
    sampling: str = "poisson"
    """Who takes part in a round: ``poisson`` (each client independently with ``sampling_rate``),
    ``fixed`` (``clients_per_round`` drawn without replacement) or ``all``."""
    sampling_rate: float = 0.1
    """q of ``poisson`` sampling."""
    clients_per_round: int = 1
    """m of ``fixed`` sampling."""
    seed: int | None = None
    """Seeds the sampling and the noise for a reproducible research run; unset (the default),
    both come from the operating system's entropy, as a real deployment needs."""
    adaptive_clipping: bool = False
    """Adapt C each round towards the ``target_quantile`` of the clients' update norms
    (Andrew et al., NeurIPS 2021); ``clip_norm`` is then the initial C."""
    target_quantile: float = 0.5
    """γ: the share of clients whose update should fit under C."""
    clip_lr: float = 0.2
    """η of the geometric update C ← C·exp(−η(b̃ − γ))."""
    count_noise: float = 0.0
    """σ_b: the noise on the count of unclipped clients; 0 = the expected clients per round
    / 20 (Andrew et al.'s choice). Must exceed z/2: the update's noise then grows to
    z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), so that the round as a whole still has multiplier z."""

    modulus_bits: int = 32
    """b of ``distributed`` noise: the noisy sum lives modulo 2^b (bits per value a packed wire
    would carry); fewer bits mean a coarser scale, a looser rounding bound and a larger ε."""
    dropout_tolerance: float = 0.2
    """``distributed``: the share of a round's sampled clients that may drop out while the sum
    still carries noise z·C; each client adds the noise of 1/⌈(1 − tolerance)·n⌉ of it, and a
    round with fewer clients in the sum is aborted before it is unmasked."""

    def __post_init__(self) -> None:
        _one_of(self.placement, "dp.placement", DP_PLACEMENTS)
        _one_of(self.accountant, "dp.accountant", DP_ACCOUNTANTS)
        _one_of(self.sampling, "dp.sampling", DP_SAMPLING)
        _require(self.clip_norm > 0, "dp.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(
            self.noise_multiplier >= 0,
            "dp.noise_multiplier",
            f"must be >= 0, got {self.noise_multiplier}",
        )
        _require(
            self.target_epsilon >= 0,
            "dp.target_epsilon",
            f"must be >= 0 (0 = use dp.noise_multiplier), got {self.target_epsilon}",
        )
        _require(0 < self.delta < 1, "dp.delta", f"must be in (0, 1), got {self.delta}")
        _require(
            0 < self.sampling_rate <= 1,
            "dp.sampling_rate",
            f"must be in (0, 1], got {self.sampling_rate}",
        )
        _require(
            self.clients_per_round >= 1,
            "dp.clients_per_round",
            f"must be >= 1, got {self.clients_per_round}",
        )
        _require(
            0 < self.target_quantile < 1,
            "dp.target_quantile",
            f"must be in (0, 1), got {self.target_quantile}",
        )
        _require(self.clip_lr > 0, "dp.clip_lr", f"must be > 0, got {self.clip_lr}")
        _require(self.count_noise >= 0, "dp.count_noise", f"must be >= 0, got {self.count_noise}")
        _require(
            8 <= self.modulus_bits <= 62,
            "dp.modulus_bits",
            f"must be in 8..62 (the sum is read as int64), got {self.modulus_bits}",
        )
        _require(
            0 <= self.dropout_tolerance < 1,
            "dp.dropout_tolerance",
            f"must be in [0, 1), got {self.dropout_tolerance}",
        )
        if self.enabled:
            self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that only conflict when DP is on."""
        _require(
            not (self.adaptive_clipping and self.placement != "central"),
            "dp.adaptive_clipping",
            f"needs dp.placement=central, got {self.placement}: the count of unclipped clients "
            "gets its noise on the server",
        )
        _require(
            (self.noise_multiplier > 0) != (self.target_epsilon > 0),
            "dp.noise_multiplier",
            f"give z (dp.noise_multiplier > 0) or dp.target_epsilon > 0, exactly one; got "
            f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}",
        )
        _require(
            not (self.accountant == "pld" and self.sampling == "fixed"),
            "dp.accountant",
            "pld does not account sampling without replacement (dp.sampling=fixed) in "
            "dp-accounting; use dp.accountant=rdp or dp.sampling=poisson",
        )
        _require(
            not (self.accountant == "pld" and self.placement == "distributed"),
            "dp.accountant",
            "pld does not account the distributed discrete Gaussian (a zCDP bound) in "
            "dp-accounting; use dp.accountant=rdp with dp.placement=distributed",
        )


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


@dataclass
class Config:
    """A whole fedllama run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.data.partition == "institution" and self.data.source == "demo":
            _require(
                self.simulation.num_clients <= 4,
                "simulation.num_clients",
                f"is {self.simulation.num_clients}, but data.partition=institution on the demo "
                "data has 4 institutions; use data.partition=iid or dirichlet for more clients",
            )
        _require(
            self.server.min_replies <= self.simulation.num_clients,
            "server.min_replies",
            f"is {self.server.min_replies}, more than simulation.num_clients="
            f"{self.simulation.num_clients}",
        )
        if self.dp.enabled:
            self._check_dp()
        if self.robust.enabled:
            self._check_robust()
        if self.secagg.enabled:
            _require(
                self.simulation.num_clients >= 2,
                "secagg.enabled",
                "needs at least 2 clients (the sum of one client's update is that update), got "
                f"simulation.num_clients={self.simulation.num_clients}",
            )
            _require(
                self.simulation.num_clients <= self.secagg.max_clients,
                "secagg.quantization_bits",
                f"is {self.secagg.quantization_bits}: the 64-bit sum holds at most "
                f"{self.secagg.max_clients} clients, simulation.num_clients is "
                f"{self.simulation.num_clients}",
            )

    def _check_robust(self) -> None:
        key = "robust.combiner" if self.robust.combiner != "mean" else "robust.norm_bound"
        what = (
            f"robust.combiner={self.robust.combiner}"
            if self.robust.combiner != "mean"
            else "a norm bound on each update"
        )
        if self.secagg.enabled:
            individual = (
                f"robust.combiner={self.robust.combiner}"
                if self.robust.combiner != "mean"
                else "robust.norm_bound_median (a bound from the round's median norm)"
            )
            _require(
                self.robust.combiner == "mean" and self.robust.norm_bound_median == 0,
                "robust.combiner" if self.robust.combiner != "mean" else "robust.norm_bound_median",
                f"{individual} needs each client's update, and secure aggregation shows the "
                "server only their sum; use robust.norm_bound (clients clip to it, the server "
                "checks the sum: docs/robustness.md)",
            )
        _require(
            not self.dp.enabled,
            key,
            f"{what} is not used with dp.enabled: DP's clipping (dp.clip_norm) already bounds "
            "every update, and its noise is calibrated to a sum of clipped updates, not to "
            "a robust statistic",
        )
        if self.robust.combiner in ("krum", "multi_krum"):
            need = 2 * self.robust.byzantine + 3
            _require(
                self.simulation.num_clients >= need,
                "robust.byzantine",
                f"is {self.robust.byzantine}: Krum needs n >= 2f + 3 = {need} clients per "
                f"round, simulation.num_clients is {self.simulation.num_clients}",
            )

    def _check_dp(self) -> None:
        _require(
            self.server.fraction_train == 1.0,
            "server.fraction_train",
            f"is {self.server.fraction_train}, but with dp.enabled dp.sampling decides who takes "
            "part in a round (the accountant must know how); leave server.fraction_train at 1.0",
        )
        _require(
            self.dp.sampling != "fixed" or self.dp.clients_per_round <= self.simulation.num_clients,
            "dp.clients_per_round",
            f"is {self.dp.clients_per_round}, more than simulation.num_clients="
            f"{self.simulation.num_clients}",
        )
        mixed = sorted(set(self.lora.client_ranks) - {self.lora.r})
        _require(
            not mixed,
            "lora.client_ranks",
            f"has ranks {mixed} besides lora.r={self.lora.r}: with dp.enabled every client must "
            "train at lora.r (per-slot denominators of mixed ranks would reveal who took part)",
        )
        _require(
            self.dp.placement != "distributed" or self.secagg.enabled,
            "dp.placement",
            "is distributed, which needs secagg.enabled=true: the clients' noise shares only "
            "protect anyone inside a sum the server cannot take apart",
        )


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "config"
    msg = str(err).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node: Any = OmegaConf.structured(Config)
        if parent:
            node = OmegaConf.select(node, parent)
        names = sorted(str(k) for k in node) if isinstance(node, DictConfig) else ["?"]
        valid = ", ".join(names)
        return f"{key}: unknown key; valid keys here: {valid}"
    return f"{key}: {msg}"


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a config: defaults, then the YAML at ``path``, then ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or unreadable, a key is unknown, a value has the wrong
            type, or a value is out of range. The message names the key.
    """
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = OmegaConf.load(p)
        except Exception as err:  # yaml errors have no common base in OmegaConf
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(
                f"config file {str(p)!r} is a YAML list; expected a mapping "
                f"of sections ({', '.join(f.name + ':' for f in fields(Config))})"
            )
        if not loaded:
            raise ConfigError(
                f"config file {str(p)!r} is empty; give at least one section (e.g. model:), or "
                "no file for the defaults"
            )
        layers.append(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, Config)
    return cfg


def to_yaml(cfg: Config) -> str:
    """Serialise a config (the inverse of :func:`from_yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str, overrides: Sequence[str] = ()) -> Config:
    """Parse a config serialised by :func:`to_yaml`, with optional overrides.

    The text is data: a serialised config was resolved where it was made, so an interpolation
    (``${...}``) is refused, never resolved. A client that parses the server's config would
    otherwise resolve ``${oc.env:VAR}`` on its own machine and could send the value back.

    Raises:
        ConfigError: the text is not a YAML mapping, holds an interpolation, or is not a valid
            config (the message names the key).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"the serialised config is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the serialised config is a {type(data).__name__}, not a mapping")
    _refuse_interpolations(data, "")
    layers = [OmegaConf.structured(Config), OmegaConf.create(data)]
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, Config)
    return cfg


def _refuse_interpolations(value: Any, key: str) -> None:
    """Raise ConfigError naming the first key whose string value holds ``${``."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_interpolations(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_interpolations(v, f"{key}[{i}]")
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(
            f"{key}: holds an interpolation ({value!r}); a serialised config is data and "
            "nothing in it is resolved"
        )
