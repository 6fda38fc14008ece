"""PF2LoRA: personalized federated fine-tuning with two-level LoRA, learned by bilevel optimisation.

Hao, Wu, Payani, Lee, Liu, "Personalized Federated Fine-tuning for Heterogeneous
Data: An Automatic Rank Learning Approach via Two-Level LoRA", arXiv:2503.03920.

Communicated: the shared factors theta = (A, B) of every adapted layer (and the
task head when ``model.head: shared``). Local: the personal factors
phi_k = (C_k, D_k) (and the head when ``model.head: personal``), which never
leave the client.

One local round (PF2LORA.md, Local round), repeated ``fed.local_steps`` times::

    phi'  = phi - beta * grad_phi G(theta, phi; xi)           # lower level, J SGD steps
    h     = d/dtheta F(theta, phi'(theta); zeta)              # hypergradient
    theta = AdamW(theta, h);  phi = phi'

With ``pf2lora.hypergrad: unrolled`` the lower step is built with
``create_graph=True`` so autograd differentiates through it, which yields
h = grad_theta F - beta * d2G/(dtheta dphi) @ grad_phi F without forming a
Hessian. ``first_order`` detaches phi' (the "without bilevel" ablation).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pf2lora_ray.algorithms.base import (
    AdamW,
    Algorithm,
    Local,
    Partition,
    RoundContext,
    Tensors,
    loss_and_grads,
    register,
)
from pf2lora_ray.lora import PERSONAL_FACTORS, SHARED_FACTORS, factor_names
from pf2lora_ray.tasks.base import Batch, ClientData, Task


def lower_level(
    task: Task,
    model: nn.Module,
    theta: Tensors,
    phi: Tensors,
    xis: Iterator[Batch],
    steps: int,
    beta: float,
    reg_lambda: float,
    unrolled: bool,
) -> Tensors:
    """``steps`` SGD steps on G(theta, phi) = loss + (lambda/2)||phi||^2 w.r.t. phi.

    With ``unrolled`` the returned phi' stays a differentiable function of theta.
    """
    names = sorted(phi)
    phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    for _ in range(steps):
        g_loss = task.loss(model, {**theta, **phi}, next(xis))
        if reg_lambda:
            g_loss = g_loss + 0.5 * reg_lambda * sum((p**2).sum() for p in phi.values())
        grads = torch.autograd.grad(
            g_loss, [phi[k] for k in names], create_graph=unrolled, allow_unused=True
        )
        phi = {
            k: phi[k] - beta * (torch.zeros_like(phi[k]) if g is None else g)
            for k, g in zip(names, grads, strict=True)
        }
        if not unrolled:
            phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    return phi


def hypergradient(
    task: Task,
    model: nn.Module,
    theta: Tensors,
    phi: Tensors,
    xis: Iterator[Batch],
    zeta: Batch,
    steps: int,
    beta: float,
    reg_lambda: float = 0.0,
    unrolled: bool = True,
) -> tuple[float, Tensors, Tensors]:
    """(F value, h = dF(theta, phi'(theta); zeta)/dtheta, phi') for one outer step."""
    theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    phi_new = lower_level(task, model, theta, phi, xis, steps, beta, reg_lambda, unrolled)
    f_val, h = loss_and_grads(task, model, {**theta, **phi_new}, sorted(theta), zeta)
    return f_val, h, {k: v.detach() for k, v in phi_new.items()}


@register("pf2lora")
class PF2LoRA(Algorithm):
    """Shared (A, B) by FedAvg of AdamW-on-hypergradient updates; personal (C_k, D_k) by SGD."""

    def ranks(self) -> tuple[int, int]:
        return self.cfg.adapter.r, self.cfg.adapter.r_personal

    def partition(self, model: nn.Module, head: list[str]) -> Partition:
        shared = factor_names(model, SHARED_FACTORS)
        personal = factor_names(model, PERSONAL_FACTORS)
        if self.cfg.model.head == "shared":
            return Partition(sorted(shared + head), personal)
        return Partition(shared, sorted(personal + head))

    def local_update(
        self,
        task: Task,
        model: nn.Module,
        theta: Tensors,
        phi: Tensors,
        data: ClientData,
        ctx: RoundContext,
    ) -> Local:
        opts = self.cfg.pf2lora
        xis, zetas = self.batches(task, data, ctx, 0), self.batches(task, data, ctx, 1)
        upper = AdamW(self.cfg.algorithm.lr, self.cfg.algorithm.weight_decay)
        f_val = float("nan")
        for _ in range(self.cfg.fed.local_steps):
            f_val, h, phi = hypergradient(
                task,
                model,
                theta,
                phi,
                xis,
                next(zetas),
                opts.lower_steps,
                opts.lr_lower,
                opts.reg_lambda,
                unrolled=opts.hypergrad == "unrolled",
            )
            theta = upper.step(theta, h)
        return Local(theta, phi, {"train_loss": f_val})
