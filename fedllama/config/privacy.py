"""The config sections of what protects a run: robustness (``robust``), secure aggregation
(``secagg``) and differential privacy (``dp``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedllama.config.sections import (
    COMBINERS,
    OVER_BOUND,
    _one_of,
    _require,
)


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
    """Fixed-point bits per value, sign included: step C / (2^(bits-1) - 1); the sum modulo
    2^modulus_bits holds up to ≈ 2^(modulus_bits-bits) clients."""
    modulus_bits: int = 64
    """m: masks and sums live modulo 2^m and each masked value travels as an m-bit integer:
    64, or 32 to halve the upload (then quantization_bits must leave room for the clients:
    at most 2^(32-bits) of them, e.g. 24 bits for up to 256 with a step of C / (2^23 - 1))."""
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
        _require(
            self.modulus_bits in SECAGG_MODULUS_BITS,
            "secagg.modulus_bits",
            f"must be 32 or 64 (the width of a masked value on the wire), got {self.modulus_bits}",
        )
        _require(
            self.quantization_bits < self.modulus_bits and self.max_clients >= 2,
            "secagg.quantization_bits",
            f"is {self.quantization_bits}: a sum of 2 clients would overflow "
            f"secagg.modulus_bits={self.modulus_bits}; at most {self.modulus_bits - 1} bits "
            "(e.g. 24 for up to 256 clients with a 32-bit modulus)",
        )

    @property
    def max_clients(self) -> int:
        """Most clients whose fixed-point sum fits in ``modulus_bits`` bits (signed)."""
        return max_clients(self.quantization_bits, self.modulus_bits)


SECAGG_MODULUS_BITS = (32, 64)


def max_clients(bits: int, modulus_bits: int) -> int:
    """Most clients whose sum of ``bits``-bit signed values fits in a signed ``modulus_bits``
    integer: (2^(m-1) - 1) // (2^(bits-1) - 1)."""
    return ((1 << (modulus_bits - 1)) - 1) // ((1 << (bits - 1)) - 1)


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
