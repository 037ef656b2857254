"""One config schema for every fedllama run, loaded with OmegaConf.

Precedence: dataclass defaults <- YAML file <- ``key=value`` overrides. The merged config is
turned into typed dataclasses (``OmegaConf.to_object``); everything downstream takes those, never
a ``DictConfig``. Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the
key and what is allowed, before any model or data is touched.

Key names follow the library they are passed to, so ``peft.LoraConfig(**cfg.lora.peft_kwargs())``
works unchanged (``peft_kwargs`` only drops ``client_ranks``, which is ours).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedllama.config.privacy import (
    DP_ACCOUNTANTS,
    DP_PLACEMENTS,
    DP_SAMPLING,
    DpConfig,
    RobustConfig,
    SecAggConfig,
)
from fedllama.config.sections import (
    COMBINERS,
    COMPUTE_DTYPES,
    DATA_FIELDS,
    FAILED_ROUND,
    LOSSLESS_CODECS,
    LR_SCHEDULES,
    MODEL_NAMES,
    OVER_BOUND,
    PARTITIONS,
    QUANTIZATIONS,
    SERVER_OPTIMIZERS,
    WIRE_CODECS,
    WIRE_DOWNLINKS,
    AdapterConfig,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    ServerConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
    WireConfig,
    _require,
)

__all__ = [
    "COMBINERS",
    "COMPUTE_DTYPES",
    "DATA_FIELDS",
    "DP_ACCOUNTANTS",
    "DP_PLACEMENTS",
    "DP_SAMPLING",
    "FAILED_ROUND",
    "LR_SCHEDULES",
    "MODEL_NAMES",
    "OVER_BOUND",
    "PARTITIONS",
    "QUANTIZATIONS",
    "SERVER_OPTIMIZERS",
    "WIRE_CODECS",
    "WIRE_DOWNLINKS",
    "AdapterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DpConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "RobustConfig",
    "SecAggConfig",
    "ServerConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
    "WireConfig",
    "from_yaml",
    "load",
    "to_yaml",
]


@dataclass
class Config:
    """A whole fedllama run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    wire: WireConfig = field(default_factory=WireConfig)
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
        if self.adapter.dense:
            self._check_dense()
        if self.dp.enabled:
            self._check_dp()
        if self.robust.enabled:
            self._check_robust()
        self._check_wire()
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
                f"is {self.secagg.quantization_bits}: the {self.secagg.modulus_bits}-bit sum "
                "holds at most "
                f"{self.secagg.max_clients} clients, simulation.num_clients is "
                f"{self.simulation.num_clients}",
            )

    def _check_dense(self) -> None:
        """A dense adapter (``adapter.kind`` other than lora) has one shape on every client and
        none of LoRA's options."""
        kind = self.adapter.kind
        _require(
            not self.lora.client_ranks,
            "lora.client_ranks",
            f"mixed ranks apply to LoRA only; adapter.kind={kind} has one shape on every client "
            "(remove lora.client_ranks or use adapter.kind=lora)",
        )
        for key in ("use_dora", "use_rslora", "target_parameters"):
            _require(
                not getattr(self.lora, key),
                f"lora.{key}",
                f"is a LoRA option; adapter.kind={kind} is not LoRA (set it false or use "
                "adapter.kind=lora)",
            )

    def _check_wire(self) -> None:
        codec = self.wire.codec
        _require(
            codec == "none" or not self.secagg.enabled,
            "wire.codec",
            f"{codec} cannot be used with secagg.enabled: SecAgg+ sums one fixed-point vector "
            "of the same length from every client, and a codec's per-client ranks, scales or "
            "indices cannot be summed under masks; use wire.codec=none",
        )
        _require(
            codec in LOSSLESS_CODECS or not self.dp.enabled,
            "wire.codec",
            f"{codec} is lossy and cannot follow DP's clipping: rounding can lift an update "
            "above dp.clip_norm, which the noise is calibrated to (and top-k's error feedback "
            "re-sends what clipping bounded); use wire.codec=strip or none",
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
        _require(
            self.dp.placement != "distributed" or self.dp.modulus_bits <= self.secagg.modulus_bits,
            "dp.modulus_bits",
            f"is {self.dp.modulus_bits}, more than secagg.modulus_bits="
            f"{self.secagg.modulus_bits}: the noisy sum travels inside SecAgg+'s modulus",
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


def _build(layers: list[Any]) -> Config:
    """The typed Config from OmegaConf layers (schema, file, overrides); a bad key or value
    is a ConfigError naming it (a section's own check is re-raised as it was)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, Config)
    return cfg


def _config_hint(missing: Path) -> str:
    """What to pass instead of a config file that is not there."""
    shipped = Path(__file__).resolve().parents[2] / "simulations" / "configs"
    near = missing.parent if missing.parent.is_dir() else shipped
    names = sorted(f.name for f in near.glob("*.yaml")) if near.is_dir() else []
    if names:
        return f"pass one of {', '.join(names)} in {near} (or write one: docs/config.md)"
    return "pass the path of a YAML config (docs/config.md; e.g. simulations/configs/demo.yaml)"


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
            raise ConfigError(f"config file {str(p)!r} does not exist", hint=_config_hint(p))
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
    return _build(layers)


def to_yaml(cfg: Config) -> str:
    """Serialise a config (the inverse of :func:`from_yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str, overrides: Sequence[str] = ()) -> Config:
    """Parse a config serialised by :func:`to_yaml`, with optional overrides.

    The text is data: a serialised config was resolved where it was made, so an interpolation
    (``${...}``) is refused, never resolved. A client that parses the server's config would
    otherwise resolve ``${oc.env:VAR}`` on its own machine and could send the value back.

    A simulated client parses the same text every message (about 0.1 s of OmegaConf each, more
    than two training steps of the tiny model), so the parsed config is kept per text and a copy
    is returned.

    Raises:
        ConfigError: the text is not a YAML mapping, holds an interpolation, or is not a valid
            config (the message names the key).
    """
    return copy.deepcopy(_parse(text, tuple(overrides)))


@functools.lru_cache(maxsize=8)
def _parse(text: str, overrides: tuple[str, ...]) -> Config:
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
    return _build(layers)


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
