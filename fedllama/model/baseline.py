"""Baselines from a run's own config: what the federation is measured against.

* **centralized**: every client's training examples pooled in one place, one fresh adapter
  trained on them for as many optimizer steps as the whole federation takes
  (``server.rounds × clients per round × train.local_steps``), with the same batch size,
  gradient accumulation, learning rate, schedule and clipping; one AdamW and one schedule over
  all the steps (a centralized run does not restart its optimizer every "round"). The global
  eval loss is recorded after each round's worth of steps, a curve beside the federated one.
* **local-only**: each client alone, from the same fresh adapter, for the steps it would take in
  the federation if it took part in every round (``server.rounds × train.local_steps``), scored
  on the global eval set and on its own eval split.

Both start from the server's initial adapter (``fresh_adapter(model, data.seed)``) and are
scored with ``train.evaluate`` on the global eval set, encoded as the server's ``Evaluator``
encodes it, so ``eval0`` (the initial adapter's loss) equals round 0 of a federated run of the
same config. FedProx's proximal term is off (there is no global model to stay near); the merge
strategy and ``lora.client_ranks`` play no part (everything trains at ``lora.r``).

The results go to ``<output.dir>/baselines/{centralized,local}.json`` with the resolved config
keys they depend on (:func:`resolved_keys`), so a report refuses a baseline of another config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedllama import data
from fedllama.config import Config
from fedllama.data import Encoded
from fedllama.merge import AdapterState
from fedllama.model import adapters, train
from fedllama.model.base import cache_root
from fedllama.model.lora import fresh_adapter, get_lora_model, set_frozen, set_residual

log = logging.getLogger(__name__)

BASELINES_DIR = "baselines"
CENTRALIZED = "centralized.json"
LOCAL = "local.json"
KINDS = ("centralized", "local", "both")

_SECTIONS = ("model", "adapter", "lora", "data", "train")
"""Whole sections a baseline depends on (one a config lacks, in another version, is skipped)."""
_KEYS = (
    "server.rounds",
    "server.fraction_train",
    "server.min_replies",
    "simulation.num_clients",
    "dp.enabled",
    "dp.sampling",
    "dp.sampling_rate",
    "dp.clients_per_round",
)
_MAY_DIFFER = frozenset({"model.cache_dir"})
"""Where things are, not what the baseline is (as ``server.checkpoint`` resumes a moved cache)."""


def resolved_keys(cfg: Config) -> dict[str, Any]:
    """Dotted config key -> value (JSON types) for every key a baseline depends on."""
    out: dict[str, Any] = {}
    for section in (s for s in _SECTIONS if hasattr(cfg, s)):
        for key, value in asdict(getattr(cfg, section)).items():
            out[f"{section}.{key}"] = value
    for dotted in _KEYS:
        section, key = dotted.split(".")
        out[dotted] = getattr(getattr(cfg, section), key)
    out = {k: v for k, v in out.items() if k not in _MAY_DIFFER}
    return dict(json.loads(json.dumps(out, sort_keys=True)))  # tuples -> lists, as JSON reads


def fingerprint(keys: dict[str, Any]) -> str:
    """A short hash of :func:`resolved_keys` (equal keys, equal fingerprint)."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def clients_per_round(cfg: Config) -> int:
    """Clients a federated round trains, as the server samples them: without DP Flower's
    ``max(int(num_clients × fraction_train), min_replies)``; with DP the sampler's expected
    count (``all``: every client, ``fixed``: ``clients_per_round``, ``poisson``: q × clients,
    rounded, at least 1). Every sampled client is assumed to reply."""
    n = cfg.simulation.num_clients
    if not cfg.dp.enabled:
        return min(n, max(int(n * cfg.server.fraction_train), cfg.server.min_replies))
    if cfg.dp.sampling == "all":
        return n
    if cfg.dp.sampling == "fixed":
        return min(cfg.dp.clients_per_round, n)
    return max(1, round(cfg.dp.sampling_rate * n))


def total_steps(cfg: Config) -> int:
    """Optimizer steps a federated run takes in all: rounds × clients per round × local steps."""
    return cfg.server.rounds * clients_per_round(cfg) * cfg.train.local_steps


@dataclass
class Setup:
    """The federation and the model a baseline trains, built as a simulated run builds them."""

    cfg: Config
    federation: data.Federation
    model: Any
    tokenizer: Any
    global_eval: list[Encoded]
    initial: AdapterState
    """The server's round-0 adapter: peft's init drawn from ``data.seed``."""

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def reset(self) -> None:
        """The model back at the initial adapter, every factor trainable, no residual."""
        set_residual(self.model, {}, self.cfg)
        adapters.set_adapter_state(self.model, self.initial)
        set_frozen(self.model, frozenset())

    def score(self, examples: list[Encoded]) -> float:
        """Eval loss of the model as it is, as the server's ``Evaluator`` computes it."""
        return train.evaluate(self.model, examples, self.cfg.train.eval_batch_size, self.pad_id)

    def encode(self, examples: list[data.Example]) -> list[Encoded]:
        return data.encode_all(self.tokenizer, examples, self.cfg.data)


def setup(cfg: Config) -> Setup:
    """The same federation, global eval set and initial adapter a simulated run of ``cfg`` has."""
    federation = data.build_federation(cfg.data, cfg.simulation.num_clients, cache_root(cfg.model))
    lora_model, tokenizer = get_lora_model(cfg)
    set_residual(lora_model, {}, cfg)
    initial = fresh_adapter(lora_model, cfg.data.seed)
    global_eval = data.encode_all(tokenizer, federation.global_eval, cfg.data)
    return Setup(cfg, federation, lora_model, tokenizer, global_eval, initial)


def _train(
    run: Setup,
    examples: list[Encoded],
    steps: int,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> train.TrainResult:
    """``steps`` steps from the initial adapter with one optimizer and one schedule (the
    schedule spans all ``steps``; FedProx off)."""
    run.reset()
    cfg = replace(run.cfg.train, local_steps=steps, fedprox_mu=0.0)
    torch.manual_seed(seed)  # dropout, as a client seeds its round
    return train.train_local(run.model, examples, cfg, run.pad_id, seed, progress)


def assumption(cfg: Config) -> str:
    """The total-steps assumption, in words (written with the results and shown in reports)."""
    k = clients_per_round(cfg)
    return (
        f"{cfg.server.rounds} rounds x {k} clients per round x {cfg.train.local_steps} local "
        f"steps = {total_steps(cfg)} optimizer steps (every sampled client replies; "
        f"{cfg.simulation.num_clients} clients, fraction_train={cfg.server.fraction_train}, "
        f"min_replies={cfg.server.min_replies}"
        + (f", dp.sampling={cfg.dp.sampling}" if cfg.dp.enabled else "")
        + ")"
    )


def centralized(run: Setup) -> dict[str, Any]:
    """Train one adapter on every client's training examples pooled; the global eval loss
    after each round's worth of steps (``curve``: [round, loss], round 0 = ``eval0``)."""
    cfg = run.cfg
    pooled = run.encode([ex for split in run.federation.clients for ex in split.train])
    chunk = clients_per_round(cfg) * cfg.train.local_steps
    steps = total_steps(cfg)
    run.reset()
    eval0 = run.score(run.global_eval)
    curve = [[0, eval0]]
    log.info("centralized: %d pooled examples, %s", len(pooled), assumption(cfg))
    log.info("centralized: round 0 (initial adapter) eval_loss %.4f", eval0)

    def progress(step: int, loss: float) -> None:
        if step % chunk == 0 or step == steps:
            curve.append([math.ceil(step / chunk), run.score(run.global_eval)])
            run.model.train()  # train_local goes on after this callback
            log.info(
                "centralized: round %d/%d (%d/%d steps) train_loss %.4f eval_loss %.4f",
                curve[-1][0], cfg.server.rounds, step, steps, loss, curve[-1][1],
            )  # fmt: skip

    result = _train(run, pooled, steps, cfg.data.seed, progress)
    return {
        "kind": "centralized",
        "assumption": assumption(cfg),
        "optimizer": "one AdamW and one lr schedule over all steps (not reset per round)",
        "clients_per_round": clients_per_round(cfg),
        "steps": result.steps,
        "train_examples": result.num_examples,
        "eval0": eval0,
        "eval_loss": curve[-1][1],
        "curve": curve,
        "train_loss": result.train_loss,
        "seconds": result.seconds,
    }


def local_only(run: Setup) -> dict[str, Any]:
    """Each client alone for ``server.rounds × train.local_steps`` steps on its own training
    split; its loss on the global eval set and on its own eval split, and the means weighted
    by training examples."""
    cfg = run.cfg
    steps = cfg.server.rounds * cfg.train.local_steps
    log.info("local: %d clients alone, %d steps each", len(run.federation.clients), steps)
    run.reset()
    eval0 = run.score(run.global_eval)
    clients = []
    for cid, split in enumerate(run.federation.clients):
        own = run.encode(split.eval)
        run.reset()
        own0 = run.score(own)
        result = _train(run, run.encode(split.train), steps, cfg.data.seed + 1 + cid)
        entry = {
            "client_id": cid,
            "train_examples": result.num_examples,
            "own_eval_examples": len(own),
            "steps": result.steps,
            "global_eval_loss": run.score(run.global_eval),
            "own_eval0": own0,
            "own_eval_loss": run.score(own),
            "train_loss": result.train_loss,
            "seconds": result.seconds,
        }
        clients.append(entry)
        log.info(
            "local: client %d/%d (%d examples, %d steps): global eval %.4f, own eval %.4f -> %.4f",
            cid + 1, len(run.federation.clients), result.num_examples, steps,
            entry["global_eval_loss"], own0, entry["own_eval_loss"],
        )  # fmt: skip
    return {
        "kind": "local",
        "steps_per_client": steps,
        "eval0": eval0,
        "clients": clients,
        "mean": weighted_means(clients),
    }


def weighted_means(clients: list[dict[str, Any]]) -> dict[str, Any]:
    """Clients' global and own eval losses averaged with their training examples as weights."""
    total = sum(c["train_examples"] for c in clients)
    return {
        "weights": "training examples",
        **{
            key: sum(c[key] * c["train_examples"] for c in clients) / total
            for key in ("global_eval_loss", "own_eval_loss")
        },
    }


def write(out: Path, name: str, result: dict[str, Any], cfg: Config) -> Path:
    """``out/baselines/<name>`` (atomically), with the config keys it was measured under."""
    keys = resolved_keys(cfg)
    body = {**result, "fingerprint": fingerprint(keys), "config": keys}
    folder = out / BASELINES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, folder / name)
    return folder / name


def run_baselines(cfg: Config, kind: str = "both") -> list[Path]:
    """Measure the ``kind`` baselines (``centralized``, ``local`` or ``both``) of ``cfg`` and
    write them under ``output.dir``; the files written."""
    if kind not in KINDS:
        raise ValueError(f"baseline kind {kind!r}: expected one of {', '.join(KINDS)}")
    t0 = time.perf_counter()
    run = setup(cfg)
    out = Path(cfg.output.dir)
    written = []
    if kind in ("centralized", "both"):
        written.append(write(out, CENTRALIZED, centralized(run), cfg))
    if kind in ("local", "both"):
        written.append(write(out, LOCAL, local_only(run), cfg))
    log.info("baselines written in %.0f s: %s", time.perf_counter() - t0, written)
    return written
