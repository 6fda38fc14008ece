"""Effective rank of a client's update dW = s B A + s~ D C without forming dW.

dW = [sB, s~D] @ [A; C] = U @ V with U (m x k), V (k x n), k = r + r~. With
U = Q_U R_U and V^T = Q_V R_V (thin QR), dW = Q_U (R_U R_V^T) Q_V^T, so the
singular values of dW are those of the k x k core R_U R_V^T (PF2LORA.md).
"""

from __future__ import annotations

import torch


def factored_singular_values(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of ``U @ V`` from U (m x k) and V (k x n), in float64."""
    U, V = U.detach().to(torch.float64), V.detach().to(torch.float64)
    if U.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    if not (torch.isfinite(U).all() and torch.isfinite(V).all()):  # a diverged run: no rank
        return torch.full((U.shape[1],), float("nan"), dtype=torch.float64)
    # mode="r": the same R from the same factorisation, without forming Q (half the work).
    _, r_u = torch.linalg.qr(U, mode="r")  # (k, k) when m >= k
    _, r_v = torch.linalg.qr(V.T, mode="r")  # (k, k) when n >= k
    return torch.linalg.svdvals(r_u @ r_v.T)


def energy_rank(s: torch.Tensor, tau: float = 0.99) -> int | None:
    """Smallest j with sum_{i<=j} s_i^2 >= tau * sum_i s_i^2 (0 for a zero matrix).

    None when ``s`` is not finite (the update diverged).
    """
    if not torch.isfinite(s).all():
        return None
    e = s.to(torch.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0)
    return int(torch.searchsorted(cum, tau * total * (1 - 1e-12)).item()) + 1


def threshold_rank(s: torch.Tensor, eps: float = 0.05) -> int | None:
    """Number of singular values above ``eps`` times the largest (None when not finite)."""
    if not torch.isfinite(s).all():
        return None
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > eps * s[0]).sum().item())


def update_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None,
    D: torch.Tensor | None,
    scaling: float,
    scaling_personal: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U @ V = s B A + s~ D C; the personal pair may be absent."""
    if C is None or D is None or C.numel() == 0:
        return B * scaling, A
    return torch.cat([B * scaling, D * scaling_personal], 1), torch.cat([A, C], 0)
