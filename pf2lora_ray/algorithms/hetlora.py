"""HetLoRA: heterogeneous client ranks, rank self-pruning, sparsity-weighted aggregation.

Cho, Liu, Wang, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024.

The global adapter has rank r_max (``hetlora.r_max``). Client k has rank
r_k, drawn once from (seed, client) uniformly in [r_min, r_max] and kept in
its personal state as ``hetlora.rank``. A round on client k (what this module
implements, step by step):

1. Truncation: it trains the first r_k rows of every A and the first r_k
   columns of every B; the rest are zeroed and their gradients masked.
2. Local training: ``fed.local_steps`` AdamW steps on
   loss + reg * sum_layers ||B[:, t:r_k]||_F * ||A[t:r_k, :]||_F,  t = floor(gamma * r_k)
   (the rank regulariser on the tail dimensions; reg = ``hetlora.reg``,
   gamma = ``hetlora.gamma``).
3. Self-pruning: if that tail norm at the end of this round is smaller than
   at the end of the client's previous round (kept as ``hetlora.tail_norm``),
   r_k <- max(r_min, floor(gamma * r_k)). Ranks only shrink and never below
   r_min; after a prune the stored tail norm is reset (no previous value for
   the new tail), so a client prunes at most every other participation.
4. The client sends its factors zero-padded to r_max, weighted by
   S_k = ||Delta W_k||_F, the Frobenius norm of its whole update
   (sqrt of sum over layers of ||s B A||_F^2, computed from r x r Gram
   matrices, never an m x n product). One weight per client covers all
   layers (the paper weights each module; our contribution carries one
   scalar weight per client).
5. The driver replaces theta by sum_k S_k theta_k / sum_k S_k (moved by
   ``fed.server_lr``; 1 = plain replacement).

Communicated: the first r_k rows/columns of A and B (and the head when
``model.head: shared``); :meth:`communicated_names` lists the r_max-shaped
tensors, an upper bound (each client's ``rank`` train metric gives the exact
count). Local: r_k and the last tail norm (and the head when personal).
Evaluation uses theta truncated to the client's current r_k.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pf2lora_ray import seeds
from pf2lora_ray.algorithms.base import AdamW, Algorithm, ClientRound, Local, Tensors, register
from pf2lora_ray.tasks.base import Params

RANK = "hetlora.rank"  # personal state: the client's current rank r_k, int64 (1,)
TAIL = "hetlora.tail_norm"  # personal state: tail norm at the end of the last round, float64 (1,)
STATE = (RANK, TAIL)


def client_rank(seed: int, client_id: int, r_min: int, r_max: int) -> int:
    """Client k's initial rank, uniform in [r_min, r_max], from (seed, client) only."""
    return int(seeds.rng(seed, seeds.HETLORA_RANK, client_id).integers(r_min, r_max + 1))


def model_params(phi: Tensors) -> Tensors:
    """The model parameters among a client's personal state (its rank and tail norm left out)."""
    return {k: v for k, v in phi.items() if k not in STATE}


def layers(names: list[str]) -> list[str]:
    """Adapted layers (prefixes) that have both an A and a B factor among ``names``."""
    a = {n.removesuffix(".lora_A") for n in names if n.endswith(".lora_A")}
    b = {n.removesuffix(".lora_B") for n in names if n.endswith(".lora_B")}
    return sorted(a & b)


def rank_masks(params: Tensors, r: int) -> Tensors:
    """1 on the first r rows of each A / columns of each B, 0 beyond (other names: absent)."""
    out = {}
    for layer in layers(sorted(params)):
        a, b = params[f"{layer}.lora_A"], params[f"{layer}.lora_B"]
        out[f"{layer}.lora_A"] = (torch.arange(a.shape[0], device=a.device) < r).to(a.dtype)[
            :, None
        ]
        out[f"{layer}.lora_B"] = (torch.arange(b.shape[1], device=b.device) < r).to(b.dtype)[
            None, :
        ]
    return out


def truncate(params: Tensors, r: int) -> Tensors:
    """``params`` with every A row / B column from index r on set to zero."""
    masks = rank_masks(params, r)
    return {k: v * masks[k] if k in masks else v for k, v in params.items()}


def tail_norm(params: Tensors, r: int, gamma: float) -> torch.Tensor:
    """sum_layers ||B[:, t:r]||_F * ||A[t:r, :]||_F with t = floor(gamma * r) (differentiable)."""
    t = math.floor(gamma * r)
    total = torch.zeros((), dtype=torch.float64)
    for layer in layers(sorted(params)):
        a, b = params[f"{layer}.lora_A"], params[f"{layer}.lora_B"]
        total = total + (torch.linalg.norm(b[:, t:r]) * torch.linalg.norm(a[t:r])).double()
    return total


def pruned_rank(r: int, gamma: float, r_min: int, tail_now: float, tail_prev: float) -> int:
    """floor(gamma * r), not below r_min, when the tail norm fell since last round; else r.

    A NaN ``tail_prev`` (no previous round at this rank) never prunes.
    """
    if not tail_now < tail_prev:
        return r
    return max(r_min, min(r, math.floor(gamma * r)))


def update_norm(params: Tensors, scaling: float) -> float:
    """||Delta W||_F over all layers, Delta W_l = s B_l A_l, from r x r Gram matrices.

    ||B A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T)) for symmetric Grams.
    """
    sq = 0.0
    for layer in layers(sorted(params)):
        a = params[f"{layer}.lora_A"].detach().double()
        b = params[f"{layer}.lora_B"].detach().double()
        sq += float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0))
    return scaling * math.sqrt(sq)


@register("hetlora")
class HetLoRA(Algorithm):
    """Client ranks in [r_min, r_max] with truncation, tail regulariser, self-pruning."""

    def ranks(self) -> tuple[int, int]:
        return self.cfg.hetlora.r_max, 0

    def init_personal(self, model: nn.Module, phi: Tensors, client_id: int) -> Tensors:
        opts = self.cfg.hetlora
        device = next(model.parameters()).device
        r_k = client_rank(self.cfg.seed, client_id, opts.r_min, opts.r_max)
        return {
            **phi,
            RANK: torch.tensor([r_k], dtype=torch.int64, device=device),
            TAIL: torch.tensor([math.nan], dtype=torch.float64, device=device),
        }

    def local_update(self, client: ClientRound) -> Local:
        opts, task, model, phi = self.cfg.hetlora, client.task, client.model, client.phi
        r = int(phi[RANK])
        params = truncate({**client.theta, **model_params(phi)}, r)
        params = {k: v.detach() for k, v in params.items()}
        masks, names = rank_masks(params, r), sorted(params)
        stream = self.batches(client)
        opt = AdamW(self.cfg.algorithm.lr, self.cfg.algorithm.weight_decay)
        loss = float("nan")
        for _ in range(self.cfg.fed.local_steps):
            leaves = {k: v.requires_grad_(True) for k, v in params.items()}
            task_loss = task.loss(model, leaves, next(stream))
            reg = opts.reg * tail_norm(leaves, r, opts.gamma).to(task_loss.dtype)
            grads = torch.autograd.grad(task_loss + reg, [leaves[k] for k in names])
            grads = {
                k: g * masks[k] if k in masks else g for k, g in zip(names, grads, strict=True)
            }
            params = opt.step({k: v.detach() for k, v in leaves.items()}, grads)
            loss = float(task_loss.detach())
        tail = float(tail_norm(params, r, opts.gamma))
        new_r = pruned_rank(r, opts.gamma, opts.r_min, tail, float(phi[TAIL]))
        params = truncate(params, new_r)
        state = {
            RANK: torch.full_like(phi[RANK], new_r),
            TAIL: torch.full_like(phi[TAIL], tail if new_r == r else math.nan),
        }
        return Local(
            {k: params[k] for k in client.theta},
            {**{k: params[k] for k in model_params(phi)}, **state},
            {"train_loss": loss, "rank": float(new_r)},
        )

    def eval_params(self, client: ClientRound) -> Params:
        return truncate({**client.theta, **model_params(client.phi)}, int(client.phi[RANK]))

    def contribution(self, client: ClientRound, local: Local) -> tuple[float, Tensors]:
        """(S_k p_k, theta_k zero-padded to r_max): replaced, not added.

        S_k = ||Delta W_k||_F is HetLoRA's sparsity weight; p_k (``fed.weighting``)
        is 1 by default, n_k with ``examples``.
        """
        scaling = self.cfg.adapter.alpha / self.cfg.hetlora.r_max
        return update_norm(local.theta, scaling) * self.weight(client.data), dict(local.theta)

    def aggregate(
        self, theta: dict[str, np.ndarray], summed: dict[str, np.ndarray], total_weight: float
    ) -> dict[str, np.ndarray]:
        """theta + eta_g * (sum_k S_k theta_k / sum_k S_k - theta); all S_k = 0 keeps theta."""
        if total_weight <= 0:
            return theta
        lr = self.cfg.fed.server_lr
        return {
            k: (theta[k] + lr * (summed[k] / total_weight - theta[k])).astype(theta[k].dtype)
            for k in sorted(theta)
        }
