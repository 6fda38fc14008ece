"""Synthetic rank-recovery study (PF2LORA.md, Synthetic rank-recovery study).

Client k observes y = (W0 + dW_k*) x + noise with x ~ N(0, I) and
dW_k* = U0 V0 (rank r0, common) + U_k V_k (rank q_k, its own), so the true rank
of client k's update is r0 + q_k. The base model is a single frozen
``nn.Linear`` named ``proj`` holding W0; adapters attach to it exactly as they
attach to a transformer's query/value projections. With ``synthetic.layers``
L > 1 it is L parallel copies of W0 (``blocks.i.proj``) whose outputs are
averaged, so that a client's personal state has a transformer's shape. A
client's validation rows are ``data.val_fraction`` of its ``synthetic.train_size``
training draws, so the test draws do not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from pf2lora_ray import seeds
from pf2lora_ray.config import Config
from pf2lora_ray.data.partition import split_off_validation
from pf2lora_ray.tasks.base import Batch, ClientData, ClientRows, Params, register_task


class LinearModel(nn.Module):
    """y = W0 x with W0 frozen; the adapter target is ``proj``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, dim) -> (batch, dim)
        return self.proj(x)


class ParallelModel(nn.Module):
    """y = mean_i W0_i x over ``layers`` frozen copies of W0; the adapter targets are ``proj``."""

    def __init__(self, weight: torch.Tensor, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinearModel(weight) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, dim) -> (batch, dim)
        return torch.stack([block(x) for block in self.blocks]).mean(0)


@dataclass
class PairSplit:
    """Inputs x (n, dim) and targets y (n, dim) of one client split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def _rows(split: PairSplit, idx: np.ndarray) -> PairSplit:
    """Rows ``idx`` of a split (the whole split, unchanged, when ``idx`` covers it)."""
    if len(idx) == len(split):
        return split
    i = torch.as_tensor(idx, dtype=torch.long)
    return PairSplit(split.x[i], split.y[i])


def call(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``params`` in place of its own parameters.

    No parameter of these models is tied to another (every block holds its own
    copy of W0), so functional_call's untying, a walk over every parameter on
    each call, is skipped: the same tensors are substituted either way.
    """
    return functional_call(model, dict(params), (x,), strict=False, tie_weights=False)


def _orthonormal(rng: np.random.Generator, dim: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, max(k, 1))))
    return q[:, :k]


@register_task("synthetic")
class SyntheticTask:
    """Linear regression clients with ground-truth update ranks r0 + q_k."""

    family = "synthetic"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.s = cfg.synthetic
        rng = seeds.rng(cfg.seed, seeds.SYNTHETIC_BASE)
        d, r0 = self.s.dim, self.s.common_rank
        self.w0 = rng.standard_normal((d, d)) / np.sqrt(d)
        # Common part U0 V0 with singular values signal * (1.0 .. 0.7).
        sig0 = self.s.signal * np.linspace(1.0, 0.7, r0)
        self.common = _orthonormal(rng, d, r0) * sig0 @ _orthonormal(rng, d, r0).T

    def true_rank(self, client_id: int) -> int:
        q = self.s.personal_ranks[client_id % len(self.s.personal_ranks)]
        return self.s.common_rank + q

    def client_update(self, client_id: int) -> np.ndarray:
        """dW_k* = U0 V0 + U_k V_k (dim x dim)."""
        q = self.s.personal_ranks[client_id % len(self.s.personal_ranks)]
        rng = seeds.rng(self.cfg.seed, seeds.SYNTHETIC_CLIENT, client_id)
        sig = self.s.signal * np.linspace(0.6, 0.4, q)
        own = _orthonormal(rng, self.s.dim, q) * sig @ _orthonormal(rng, self.s.dim, q).T
        return self.common + own

    def build_model(self) -> nn.Module:
        weight = torch.tensor(self.w0, dtype=getattr(torch, self.cfg.model.dtype))
        return LinearModel(weight) if self.s.layers == 1 else ParallelModel(weight, self.s.layers)

    def head_names(self, model: nn.Module) -> list[str]:
        return []

    def check_data(self) -> None:
        """Nothing to read: every client draws its own examples (sizes checked by the config)."""

    def client_rows(self, client_ids: Sequence[int]) -> None:
        """None: no file is partitioned, each client draws its rows from (seed, client)."""
        return None

    def client_data(
        self, client_ids: Sequence[int], rows: ClientRows | None = None
    ) -> dict[int, ClientData]:
        """Each client's draws from (seed, client); ``rows`` is always None here."""
        out = {}
        dtype = getattr(torch, self.cfg.model.dtype)
        for k in client_ids:
            rng = seeds.rng(self.cfg.seed, seeds.SYNTHETIC_DATA, k)
            w = self.w0 + self.client_update(k)

            def draw(n: int, w: np.ndarray = w, rng: np.random.Generator = rng) -> PairSplit:
                x = rng.standard_normal((n, self.s.dim))
                y = x @ w.T + self.s.noise * rng.standard_normal((n, self.s.dim))
                return PairSplit(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype))

            train, test = draw(self.s.train_size), draw(self.s.test_size)
            keep, val = split_off_validation(
                np.arange(len(train)), self.cfg.data.val_fraction, self.cfg.seed, k
            )
            out[k] = ClientData(
                k,
                _rows(train, keep),
                test,
                self.true_rank(k),
                val=_rows(train, val) if val.size else None,
            )
        return out

    def batch(self, split: PairSplit, idx: np.ndarray) -> Batch:
        i = torch.as_tensor(idx, dtype=torch.long)
        return {"x": split.x[i], "y": split.y[i]}  # (batch, dim) each

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """Squared error summed over output dims, averaged over the batch (0.5 ||e||^2)."""
        pred = call(model, params, batch["x"])
        return 0.5 * ((pred - batch["y"]) ** 2).sum(-1).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, params: Params, data: ClientData) -> dict[str, float]:
        pred = call(model, params, data.test.x)
        return {"mse": float(torch.mean((pred - data.test.y) ** 2))}
