"""What the global adapter memorised of the canaries: exposure, and an empirical ε lower bound.

**Exposure** (Carlini et al., "The Secret Sharer", USENIX Security 2019, §4): with the canary's
secret s among the space R of possible secrets, ranked by the model's loss on the answer
(lowest first), exposure = log2 |R| − log2 rank(s). We rank s among n references drawn
uniformly from R (the sampling estimate of §4.2): rank = 1 + #{references with loss <= s's},
exposure = log2 (n + 1) − log2 rank. Its largest measurable value is log2 (n + 1) bits: a
canary there is more likely than every reference; 0 means no more likely than a random secret
(in expectation exposure is about 1.44 bits for a secret the model never saw).

**Empirical ε** (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, Theorem 3.1, pure ε-DP): every candidate canary was inserted or held out by an
independent fair coin. The auditor guesses "inserted" for the k candidates with the lowest
loss and "held out" for the k with the highest, and counts c correct of the 2k guesses. If the
training were ε-DP with respect to each candidate, c would be stochastically dominated by
Binomial(2k, e^ε / (1 + e^ε)); the bound is the largest ε at which the observed c is still
less likely than ``1 − confidence``, maximised over k (a union over the k tried is accounted by
dividing the failure probability among them). It assumes δ = 0: with δ > 0 the true bound is
lower, so compare it with the accountant's ε at its δ as an indication, not a contradiction.
Under client-level DP (the unit is a client) every canary sits in one client, so a change of one
canary is within one client's change: the accountant's ε bounds each canary too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedllama.experiments.leakage import write_json


def exposure(canary_loss: float, reference_losses: Sequence[float]) -> float:
    """log2 (n + 1) − log2 rank, rank = 1 + #{references with loss <= the canary's}."""
    rank = 1 + sum(1 for loss in reference_losses if loss <= canary_loss)
    return math.log2(len(reference_losses) + 1) - math.log2(rank)


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P[Binomial(trials, p) >= successes], exactly (log-space terms)."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    if p >= 1.0:
        return 1.0
    if p <= 0.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
        + i * log_p + (trials - i) * log_q
        for i in range(successes, trials + 1)
    ]  # fmt: skip
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def epsilon_for(correct: int, guesses: int, alpha: float) -> float:
    """The largest ε with P[Binomial(guesses, e^ε/(1+e^ε)) >= correct] <= alpha (bisection;
    0 when even ε = 0 explains ``correct``)."""
    if binomial_tail(correct, guesses, 0.5) > alpha:
        return 0.0
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        p = 1.0 / (1.0 + math.exp(-mid))
        if binomial_tail(correct, guesses, p) <= alpha:
            low = mid
        else:
            high = mid
    return low


@dataclass
class Audit:
    """The one-run audit's result."""

    epsilon: float
    """The lower bound on ε (0: no evidence of leakage at this confidence)."""
    correct: int
    guesses: int
    confidence: float


def audit(inserted: Sequence[float], held_out: Sequence[float], confidence: float = 0.95) -> Audit:
    """The best one-run ε lower bound over k = 1 .. min(len) guesses of each kind.

    ``inserted`` and ``held_out`` are the candidates' losses on their own secrets (lower: more
    likely a member). The failure probability ``1 − confidence`` is split evenly over the k
    tried (a union bound), so the maximum over k keeps the stated confidence.
    """
    scored = sorted([(loss, True) for loss in inserted] + [(loss, False) for loss in held_out])
    most = min(len(inserted), len(held_out))
    best = Audit(0.0, 0, 0, confidence)
    if not most:
        return best
    alpha = (1.0 - confidence) / most
    for k in range(1, most + 1):
        correct = sum(member for _, member in scored[:k]) + sum(
            not member for _, member in scored[-k:]
        )
        eps = epsilon_for(correct, 2 * k, alpha)
        if eps > best.epsilon or not best.guesses:
            best = Audit(eps, correct, 2 * k, confidence)
    return best


BASELINE_BITS = 1 / math.log(2)
"""Exposure's expectation for a secret the model never saw: E[-log2 U] for U uniform, 1.44 bits."""


def measure(
    candidates: Sequence[tuple[bool, float, Sequence[float]]],
    dp: Mapping[str, Any] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """A round's canary report from each candidate's (inserted?, loss, reference losses).

    Exposure ranks each candidate among its own references, so it is comparable across
    candidates whose templates differ; the audit uses it as the score (higher: more likely
    inserted). ``dp`` is the round's ``MetricsRow.dp``: the accountant's ε and its assumptions.
    """
    scores = [(inserted, exposure(loss, refs)) for inserted, loss, refs in candidates]
    inside = [e for inserted, e in scores if inserted]
    outside = [e for inserted, e in scores if not inserted]
    found = audit([-e for e in inside], [-e for e in outside], confidence)
    references = len(candidates[0][2]) if candidates else 0
    return {
        "exposure": {
            "inserted": inside,
            "held_out": outside,
            "inserted_mean": statistics.fmean(inside) if inside else None,
            "held_out_mean": statistics.fmean(outside) if outside else None,
            "max_bits": math.log2(references + 1),
            "assumes": (
                f"sampled exposure (Carlini et al. 2019, §4.2): rank among {references} random "
                f"secrets of 10^6; at most log2({references}+1) bits; a secret never seen has "
                f"{BASELINE_BITS:.2f} bits on average"
            ),
        },
        "audit": {
            **asdict(found),
            "assumes": (
                "one-run audit (Steinke, Nasr & Jagielski 2023, Thm 3.1), pure ε-DP (δ = 0) per "
                f"canary, candidates inserted by independent fair coins; {confidence:.0%} "
                "confidence, union over the k tried"
            ),
        },
        "accountant": dict(dp) if dp else None,
    }


def format_line(server_round: int, report: Mapping[str, Any]) -> str:
    """One line: the round, exposure inserted vs held out, the audit's ε and the accountant's."""
    exp, aud, dp = report["exposure"], report["audit"], report["accountant"]

    def bits(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    line = (
        f"round {server_round}: exposure inserted {bits(exp['inserted_mean'])} bits "
        f"(max {bits(max(exp['inserted'], default=None))}), held out "
        f"{bits(exp['held_out_mean'])} (of at most {exp['max_bits']:.2f}); empirical ε >= "
        f"{aud['epsilon']:.2f} ({aud['correct']}/{aud['guesses']} guesses right, "
        f"{aud['confidence']:.0%}, δ = 0)"
    )
    if dp and dp.get("epsilon") is not None:
        line += f"; accountant ε = {dp['epsilon']:.2f} at δ = {dp.get('delta')}"
    return line


def write(report: Mapping[str, Any], directory: Path, server_round: int) -> Path:
    """``directory/canaries-round-NNN.json`` (strict JSON, written atomically)."""
    return write_json(report, directory / f"canaries-round-{server_round:03d}.json")
