"""Membership inference against a round's global adapter: scores, metrics and the report.

Pure functions over per-token log-probabilities: no model, no Flower. What they read comes
from the model layer (``fedllama.model.likelihood`` measures the answers,
``fedllama.model.replay`` rebuilds which examples clients trained on); ``fedllama leakage``
(``fedllama/cli.py``) composes the two and writes ``leakage-round-NNN.json``.

Every score is oriented the same way: **higher means "more likely a member"**, so one ROC
analysis serves all attacks.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from fedllama.config import Config, ConfigError, from_yaml
from fedllama.server import checkpoint
from fedllama.server.metrics import MetricsRow, read_rows

K = 0.2
"""Share of an answer's least likely tokens Min-K% and Min-K%++ average (Shi et al.: 20 %)."""
FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}
"""False-positive rates at which the true-positive rate is reported (Carlini et al., S&P 2022),
by their JSON key."""
ALPHA = 0.05
"""Significance level of the client-level test."""

THREAT_MODEL = (
    "the attacker holds the round's global adapter and the base model it was trained on "
    "(the server, or anyone the adapter is released to), can compute any text's per-token "
    "probabilities under both, and guesses for one candidate example whether a client "
    "trained on it"
)
MEMBERS = (
    "examples a client's local training drew (its batches, rebuilt from the run's config and "
    "seeds) in rounds 1..N whose update entered the global adapter"
)
NON_MEMBERS = (
    "examples of the same clients' own eval splits, which no one trains on (any whose tokens "
    "equal a member's are left out); balanced with the members per client by a seeded draw"
)
CLIENT_LEVEL = (
    "the attacker holds a sample of records the institution trained on and a sample of its "
    "records that were never trained on; it asks whether the global adapter fits the first "
    "better than the second (one-sided permutation test on the mean calibrated loss, "
    f"alpha = {ALPHA})"
)


class LeakageError(ValueError):
    """A run directory, round or its data cannot support a membership-inference measurement."""


class Measured(Protocol):
    """One example's answer tokens as measured by ``fedllama.model.likelihood``."""

    @property
    def logprob(self) -> np.ndarray:
        """(n,) log p(x_t | x_<t) of each answer token under the global model."""

    @property
    def mean(self) -> np.ndarray:
        """(n,) mu_t = E_{z ~ p(.|x_<t)} log p(z | x_<t) (Min-K%++)."""

    @property
    def std(self) -> np.ndarray:
        """(n,) the standard deviation of log p(z | x_<t) under the same distribution."""

    @property
    def base_logprob(self) -> np.ndarray:
        """(n,) the same tokens' log-probabilities under the base model (no adapter)."""

    @property
    def text(self) -> str:
        """The answer as text (special tokens dropped)."""


# --------------------------------------------------------------------------- scores


def answer_loss(logprob: np.ndarray) -> float:
    """Mean negative log-likelihood of the answer tokens: the loss training minimises."""
    return float(-np.mean(logprob))


def reference_loss(logprob: np.ndarray, base_logprob: np.ndarray) -> float:
    """The loss with the adapter minus the loss of the base without it (the base as the
    reference model): how much the adapter lowered this example's loss."""
    return answer_loss(logprob) - answer_loss(base_logprob)


def zlib_ratio(logprob: np.ndarray, text: str) -> float:
    """Loss over the zlib-compressed length of the text in bytes (Carlini et al., USENIX
    Security 2021): the loss calibrated by how compressible, and so predictable, the text is."""
    return answer_loss(logprob) / len(zlib.compress(text.encode("utf-8")))


def _lowest_mean(values: np.ndarray, k: float) -> float:
    count = max(1, int(len(values) * k))  # the k·n lowest, rounded down, at least one
    return float(np.mean(np.sort(values)[:count]))


def min_k_prob(logprob: np.ndarray, k: float = K) -> float:
    """Min-K% Prob (Shi et al., ICLR 2024): the mean log-probability of the k·n least likely
    answer tokens (at least one). A member has fewer very unlikely tokens."""
    return _lowest_mean(logprob, k)


def min_k_plus_plus(logprob: np.ndarray, mean: np.ndarray, std: np.ndarray, k: float = K) -> float:
    """Min-K%++ (Zhang et al., ICLR 2025): each token's log-probability standardised by the
    mean and standard deviation of log p(z) over the vocabulary at its position, then the mean
    of the k·n lowest. A member's tokens sit near a local maximum of the likelihood."""
    safe = np.where(std > 0, std, 1.0)
    z = np.where(std > 0, (logprob - mean) / safe, 0.0)  # a point mass: the token is the mode
    return _lowest_mean(z, k)


@dataclass(frozen=True)
class Attack:
    """A membership score: ``score(example)``, higher meaning more likely a member."""

    title: str
    paper: str
    score: Callable[[Measured], float]


ATTACKS: dict[str, Attack] = {
    "loss": Attack("-loss", "Yeom et al., CSF 2018", lambda m: -answer_loss(m.logprob)),
    "reference": Attack(
        "-(loss - base loss)",
        "reference model = the base (Carlini et al., USENIX Security 2021)",
        lambda m: -reference_loss(m.logprob, m.base_logprob),
    ),
    "zlib": Attack(
        "-loss / zlib bytes",
        "Carlini et al., USENIX Security 2021",
        lambda m: -zlib_ratio(m.logprob, m.text),
    ),
    "min_k": Attack(f"Min-{K:.0%} Prob", "Shi et al., ICLR 2024", lambda m: min_k_prob(m.logprob)),
    "min_k_pp": Attack(
        f"Min-{K:.0%}++",
        "Zhang et al., ICLR 2025",
        lambda m: min_k_plus_plus(m.logprob, m.mean, m.std),
    ),
}
"""Every attack ``fedllama leakage`` runs, by the name its JSON uses."""


# --------------------------------------------------------------------------- metrics


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """Area under the ROC curve: P(a member scores above a non-member), ties counting half
    (the Mann-Whitney U statistic over m·n, from ranks)."""
    m, n = len(members), len(non_members)
    if m == 0 or n == 0:
        raise LeakageError(f"AUC needs members and non-members, got {m} and {n}")
    ranks = _average_ranks(np.concatenate([members, non_members]))
    u = float(ranks[:m].sum()) - m * (m + 1) / 2.0
    return u / (m * n)


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the rule "member if score >= t" for every distinct score t, from the
    highest down, starting at (0, 0)."""
    thresholds = np.unique(np.concatenate([members, non_members]))[::-1]
    tpr = (len(members) - np.searchsorted(np.sort(members), thresholds, "left")) / len(members)
    fpr = (len(non_members) - np.searchsorted(np.sort(non_members), thresholds, "left")) / len(
        non_members
    )
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """The highest TPR of a threshold whose FPR is at most ``fpr``."""
    f, t = roc_curve(members, non_members)
    return float(t[f <= fpr + 1e-12].max())


def min_non_members(fpr: float) -> int:
    """Non-members a TPR at ``fpr`` needs: 1/fpr (one false positive is then ``fpr``)."""
    return round(1.0 / fpr)


def bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    members: np.ndarray,
    non_members: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(members, non_members)``: members and
    non-members are resampled with replacement separately (the class sizes stay fixed)."""
    rng = np.random.default_rng(seed)
    m, n = len(members), len(non_members)
    values = [
        statistic(members[rng.integers(0, m, m)], non_members[rng.integers(0, n, n)])
        for _ in range(resamples)
    ]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def attack_metrics(
    members: np.ndarray, non_members: np.ndarray, resamples: int, seed: int
) -> dict[str, Any]:
    """AUC and TPR at each of :data:`FPRS` with bootstrap 95 % intervals; a TPR whose FPR
    needs more non-members than there are is ``None`` with a note saying how many."""
    out: dict[str, Any] = {
        "auc": roc_auc(members, non_members),
        "auc_ci95": list(bootstrap_ci(roc_auc, members, non_members, resamples, seed)),
    }
    for key, fpr in FPRS.items():
        need = min_non_members(fpr)
        if len(non_members) < need:
            out[key] = None
            out[f"{key}_note"] = f"n/a (needs ≥ {need} non-members)"
            continue

        def at(a: np.ndarray, b: np.ndarray, fpr: float = fpr) -> float:
            return tpr_at_fpr(a, b, fpr)

        out[key] = at(members, non_members)
        out[f"{key}_ci95"] = list(bootstrap_ci(at, members, non_members, resamples, seed))
    return out


def client_level(
    members: Sequence[Measured], non_members: Sequence[Measured], permutations: int, seed: int
) -> dict[str, Any]:
    """Can the attacker tell that an institution took part? One-sided permutation test of
    "members' mean calibrated loss (loss - base loss) is lower than non-members'"."""
    a = np.array([reference_loss(x.logprob, x.base_logprob) for x in members])
    b = np.array([reference_loss(x.logprob, x.base_logprob) for x in non_members])
    observed = float(b.mean() - a.mean())
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        perm = rng.permutation(pooled)
        hits += int(perm[len(a) :].mean() - perm[: len(a)].mean() >= observed - 1e-12)
    p_value = (1 + hits) / (1 + permutations)
    return {
        "member_calibrated_loss": float(a.mean()),
        "non_member_calibrated_loss": float(b.mean()),
        "difference": observed,
        "p_value": p_value,
        "took_part": p_value < ALPHA,
        "assumption": CLIENT_LEVEL,
    }


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Contribution:
    """One client's update that entered the global adapter in one round."""

    server_round: int
    client_id: int
    num_examples: int
    steps: int


def contributions(rows: Sequence[MetricsRow], upto: int) -> list[Contribution]:
    """Every client update that entered the global adapter in rounds 1..``upto``: the counted
    clients of each round, without those a robust combiner left out; none from a round that
    was skipped or whose adapter was rejected.

    Raises:
        LeakageError: a round's row is missing or a client's lacks its id.
    """
    by_round = {r.round: r for r in rows}
    out = []
    for server_round in range(1, upto + 1):
        row = by_round.get(server_round)
        if row is None:
            raise LeakageError(f"metrics.jsonl has no row for round {server_round}")
        if row.skipped or row.rejected:
            continue
        left_out = set((row.robust or {}).get("left_out", []))
        for client in row.clients:
            if client.get("node") in left_out:
                continue
            if "client-id" not in client:
                raise LeakageError(f"round {server_round}: a client's metrics lack its client-id")
            out.append(
                Contribution(
                    server_round,
                    int(client["client-id"]),
                    int(client.get("num-examples", -1)),
                    int(client.get("steps", -1)),
                )
            )
    return out


@dataclass
class Run:
    """A finished run directory read for a measurement at one round."""

    directory: Path
    cfg: Config
    server_round: int
    contributions: list[Contribution]

    @property
    def round_dir(self) -> Path:
        """``round-NNN``: the global adapter under attack."""
        return checkpoint.round_dir(self.directory, self.server_round)

    def participation(self) -> dict[int, list[int]]:
        """Client id -> the rounds in which its update entered the global adapter."""
        out: dict[int, list[int]] = {}
        for c in self.contributions:
            out.setdefault(c.client_id, []).append(c.server_round)
        return out


def open_run(directory: Path, server_round: int | None = None) -> Run:
    """Read ``config.yaml``, the last (or the given) round and who contributed up to it.

    Raises:
        LeakageError: no run there, a round outside 1..last, or contributions the server cannot
            rebuild (a deployment's client ids, local steps other than the run's).
    """
    path = directory / checkpoint.CONFIG
    if not path.is_file():
        raise LeakageError(f"{directory} is not a run directory: {checkpoint.CONFIG} is missing")
    try:
        cfg = from_yaml(path.read_text())
    except ConfigError as err:
        raise LeakageError(f"{path}: {err}") from None
    last = checkpoint.last_round(directory)
    if not last:
        raise LeakageError(f"{directory} holds no trained round (round-001 or later)")
    chosen = last if server_round is None else server_round
    if not 1 <= chosen <= last:
        raise LeakageError(f"--round {chosen}: expected a trained round in 1..{last}")
    found = contributions(read_rows(directory), chosen)
    _check_rebuildable(cfg, found)
    return Run(directory, cfg, chosen, found)


def _check_rebuildable(cfg: Config, found: Sequence[Contribution]) -> None:
    clients = cfg.simulation.num_clients
    for c in found:
        if not 0 <= c.client_id < clients:
            raise LeakageError(
                f"round {c.server_round}: client-id {c.client_id} is not a simulation partition "
                f"(0..{clients - 1}): a deployment's data stays on its node, so its members "
                "cannot be rebuilt here"
            )
        if c.steps != cfg.train.local_steps:
            raise LeakageError(
                f"round {c.server_round}: client {c.client_id} ran {c.steps} local steps, the "
                f"run's train.local_steps is {cfg.train.local_steps} (a node-config override); "
                "its batches cannot be replayed"
            )


def check_rebuilt(run: Run, train_sizes: Mapping[int, int]) -> None:
    """Every contributing client's rebuilt training set has the size it reported.

    Raises:
        LeakageError: a size differs (the data, the cache or ``simulation.num_clients`` is not
            what the run used), naming the client and both sizes.
    """
    for c in run.contributions:
        rebuilt = train_sizes.get(c.client_id)
        if rebuilt != c.num_examples:
            raise LeakageError(
                f"round {c.server_round}: client {c.client_id} trained on {c.num_examples} "
                f"examples, its rebuilt split has {rebuilt}: the run's data (data.source, the "
                "cache) or its partitions (simulation.num_clients) differ from what it used, "
                "so its members cannot be rebuilt exactly"
            )


T = TypeVar("T")


def balance(
    members: Sequence[T], non_members: Sequence[T], cap: int | None, seed: str
) -> tuple[list[T], list[T]]:
    """As many members as non-members (at most ``cap`` of each), drawn with ``seed``; the
    draws keep the examples' order."""
    rng = random.Random(seed)
    count = min(len(members), len(non_members), cap if cap is not None else math.inf)
    count = int(count)
    pick_m = sorted(rng.sample(range(len(members)), count))
    pick_n = sorted(rng.sample(range(len(non_members)), count))
    return [members[i] for i in pick_m], [non_members[i] for i in pick_n]


# --------------------------------------------------------------------------- the report


@dataclass
class ClientSample:
    """One client's balanced, measured members and non-members."""

    client_id: int
    institutions: list[str]
    members: Sequence[Measured]
    non_members: Sequence[Measured]
    available: tuple[int, int]
    """Members and non-members there were before balancing."""


def _scores(examples: Sequence[Measured], attack: Attack) -> np.ndarray:
    return np.array([attack.score(x) for x in examples], dtype=np.float64)


def scope_metrics(
    members: Sequence[Measured], non_members: Sequence[Measured], resamples: int, seed: int
) -> dict[str, Any]:
    """Every attack's metrics over one set of members and non-members."""
    return {
        name: attack_metrics(_scores(members, a), _scores(non_members, a), resamples, seed)
        for name, a in ATTACKS.items()
    }


def build_report(
    run: Run, clients: Sequence[ClientSample], seed: int, resamples: int, cap: int | None
) -> dict[str, Any]:
    """The measurement as written to ``leakage-round-NNN.json``: settings, assumptions, overall
    and per-client metrics and the client-level test."""
    every_m = [x for c in clients for x in c.members]
    every_n = [x for c in clients for x in c.non_members]
    if not every_m:
        raise LeakageError(f"round {run.server_round}: no client example is left to score")
    per_client = []
    for c in clients:
        entry: dict[str, Any] = {
            "client_id": c.client_id,
            "institutions": c.institutions,
            "rounds": run.participation().get(c.client_id, []),
            "members": len(c.members),
            "non_members": len(c.non_members),
            "available": {"members": c.available[0], "non_members": c.available[1]},
        }
        if c.members:
            entry["attacks"] = scope_metrics(c.members, c.non_members, resamples, seed)
            entry["client_level"] = client_level(c.members, c.non_members, resamples, seed)
        per_client.append(entry)
    return {
        "run_dir": str(run.directory),
        "round": run.server_round,
        "adapter": str(run.round_dir),
        "settings": {"seed": seed, "bootstrap_resamples": resamples, "max_examples": cap, "k": K},
        "threat_model": THREAT_MODEL,
        "members": MEMBERS,
        "non_members": NON_MEMBERS,
        "reconstruction": "exact (each client's split and batch order replayed from the seeds)",
        "score_orientation": "higher = more likely a member; AUC 0.5 = chance",
        "attacks": {name: {"score": a.title, "paper": a.paper} for name, a in ATTACKS.items()},
        "overall": {
            "members": len(every_m),
            "non_members": len(every_n),
            "attacks": scope_metrics(every_m, every_n, resamples, seed),
        },
        "clients": per_client,
    }


def _ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "-"
    if ci is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _rows(scope: str, counts: str, attacks: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, m in attacks.items():
        cells = [_ci(m["auc"], m["auc_ci95"])]
        for key in FPRS:
            cells.append(
                _ci(m[key], m.get(f"{key}_ci95")) if m[key] is not None else m[f"{key}_note"]
            )
        lines.append(
            f"{scope:<28} {name:<10} {counts:>9}  {cells[0]:<24} {cells[1]:<30} {cells[2]}"
        )
        scope, counts = "", ""
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a terminal table, the assumptions above the numbers."""
    s = report["settings"]
    head = [
        f"membership inference against {report['adapter']} (round {report['round']})",
        f"threat model: {report['threat_model']}",
        f"members: {report['members']}",
        f"non-members: {report['non_members']}",
        f"scores: {report['score_orientation']}; Min-K% k = {s['k']:.0%}; 95 % intervals: "
        f"bootstrap, {s['bootstrap_resamples']} resamples, seed {s['seed']}",
        "attacks: "
        + "; ".join(f"{n} = {a['score']} ({a['paper']})" for n, a in report["attacks"].items()),
        "",
        f"{'scope':<28} {'attack':<10} {'m/n':>9}  {'AUC [95% CI]':<24} "
        f"{'TPR @ 1% FPR':<30} TPR @ 0.1% FPR",
    ]
    overall = report["overall"]
    body = _rows("overall", f"{overall['members']}/{overall['non_members']}", overall["attacks"])
    for c in report["clients"]:
        names = c["institutions"]
        which = names[0] if len(names) == 1 else f"{len(names)} institutions"
        label = f"client {c['client_id']} ({which})"
        if "attacks" not in c:
            trained = c["available"]["members"] > 0
            why = "no non-member left" if trained else "no example trained on up to this round"
            body.append(f"{label[:28]:<28} {why}")
            continue
        body += _rows(label[:28], f"{c['members']}/{c['non_members']}", c["attacks"])
    tail = ["", f"client-level inference: {CLIENT_LEVEL}"]
    for c in report["clients"]:
        if "client_level" not in c:
            continue
        t = c["client_level"]
        verdict = "took part (detected)" if t["took_part"] else "not detected"
        tail.append(
            f"  client {c['client_id']}: calibrated loss members {t['member_calibrated_loss']:+.4f}"
            f" vs non-members {t['non_member_calibrated_loss']:+.4f}, p = {t['p_value']:.4f}"
            f" -> {verdict}"
        )
    return "\n".join(head + body + tail)


def write_report(report: Mapping[str, Any], directory: Path, server_round: int) -> Path:
    """``directory/leakage-round-NNN.json`` (strict JSON, written atomically)."""
    return write_json(report, directory / f"leakage-round-{server_round:03d}.json")


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """``report`` as strict JSON at ``path``, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
