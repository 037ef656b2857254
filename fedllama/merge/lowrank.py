"""Low-rank products kept as factors: SVD without the dense matrix, and exact re-factoring.

A LoRA update is a product ``B A`` with B: (out, k) and A: (k, in). FlexLoRA's factored form and
the frozen residual adapters of FLoRA and FedEx-LoRA all need the SVD of such a product (or of a
sum of them, which is one product of stacked factors) without forming the out × in matrix:
QR of B and of Aᵀ, then the SVD of the small k × k core (Halko et al., 2011, §5.1)::

    B = Q_b R_b,  Aᵀ = Q_a R_a  =>  B A = Q_b (R_b R_aᵀ) Q_aᵀ = (Q_b U) S (Q_a V)ᵀ

Cost O((out + in)·k²) instead of O(out·in·min(out, in)).
"""

from __future__ import annotations

import torch


def product_svd(
    b: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vᵀ`` of ``b @ a`` from the factors; never forms ``b @ a``.

    Args:
        b: (out, k).
        a: (k, in).

    Returns:
        U: (out, m), S: (m,), Vᵀ: (m, in) with m = min(out, in, k), S descending.
    """
    q_b, r_b = torch.linalg.qr(b)  # (out, p) (p, k), p = min(out, k)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, q) (q, k), q = min(in, k)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the small (p, q) core
    return q_b @ u, s, vh @ q_a.T


def split_singular(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors B = U S^½, A = S^½ Vᵀ, zero-padded if there are fewer values.

    The singular values are split evenly between the factors, so the first r columns of B and
    rows of A are the best rank-r approximation for every r (Eckart-Young).
    """
    k = min(rank, s.shape[0])
    root = s[:k].clamp_min(0).sqrt()
    b = u.new_zeros(u.shape[0], rank)
    a = vh.new_zeros(rank, vh.shape[1])
    b[:, :k] = u[:, :k] * root[None, :]
    a[:k] = root[:, None] * vh[:k]
    return b, a


def compress(
    b: torch.Tensor, a: torch.Tensor, rtol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``b @ a`` with as few factor columns as its numerical rank needs.

    Singular values below ``rtol`` times the largest are dropped (they are float round-off of a
    rank-deficient stack, e.g. FedEx-LoRA's ``-B̄`` block, which lies in the span of the
    clients' B), so the result equals ``b @ a`` to about ``rtol`` relative and its rank never
    exceeds min(out, in).

    Args:
        b: (out, k).
        a: (k, in).

    Returns:
        B': (out, k'), A': (k', in) with k' <= min(out, in, k); k' = 0 for a zero product.
    """
    u, s, vh = product_svd(b, a)
    keep = int((s > rtol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0
    return split_singular(u, s, vh, keep)
