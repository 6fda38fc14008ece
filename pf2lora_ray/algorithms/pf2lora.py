"""PF2LoRA: personalized federated fine-tuning with two-level LoRA, learned by bilevel optimisation.

Hao, Wu, Payani, Lee, Liu, "Personalized Federated Fine-tuning for Heterogeneous
Data: An Automatic Rank Learning Approach via Two-Level LoRA", arXiv:2503.03920.

Communicated: the shared factors x = (A, B) of every adapted layer (and the
task head when ``model.head: shared``). Local: the personal factors
y_k = (C_k, D_k) (and the head when ``model.head: personal``), which never
leave the client.

One local step, the paper's Algorithm 1 (``pf2lora.estimator: paper``, the
default), with four independent mini-batches pi, xi, xi~, zeta of the client's
own data::

    y+ = y - beta * grad_y F(x, y; pi)                                  # lower level, SGD
    h  = grad_x F(x, y+; xi) - beta * grad2_xy F(x, y; zeta) @ grad_y F(x, y+; xi~)
    x  = AdamW(x, h);  y = y+                                           # upper level

Each term is its own forward/backward pass, so no two autograd graphs are
alive at once. The mixed term is a Hessian-vector product at the OLD y:

- ``pf2lora.hvp: autograd``: grad_x <grad_y F(x, y; zeta), v> by double
  backward (the only pass that keeps a graph of a graph), taken over
  ``pf2lora.hvp_chunks`` row slices of zeta in turn and summed by their share
  of the mean: exact, and the double graph alive at once is one slice's;
- ``pf2lora.hvp: finite_difference``: (grad_x F(x, y + eps v) - grad_x F(x, y - eps v)) / 2 eps
  on zeta, two plain forward/backward passes. eps = ``pf2lora.fd_eps`` / ||v||,
  so the probe moves y by exactly ``fd_eps`` in parameter space whatever the
  scale of v (central differences: error O(eps^2 ||v||^3 * third derivative)).

``pf2lora.estimator: shared_batches`` is the first implementation: one lower
batch (pi = zeta) and one upper batch (xi = xi~); the lower step(s) are built
with ``create_graph=True`` and autograd differentiates F(x, y+(x)) through
them, which gives the same h when all four batches are one batch. It also
supports ``lower_steps`` J > 1. ``pf2lora.hypergrad: first_order`` drops the
mixed term (h = grad_x F(x, y+; xi)): the "without bilevel" ablation.

Passes per step (one pass = one forward + one backward over the model):
paper/autograd 3 + one double-backward pass; paper/finite_difference 5;
first_order 2; HOMLoRA 1. ``pf2lora bench cost`` measures them.

``pf2lora.upper_state: persist`` keeps each client's AdamW moments for x in
its personal state (under ``pf2lora.adam.*``), so they move and checkpoint with
C_k, D_k: 2 floats per shared parameter plus a step count, per client.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pf2lora_ray import seeds
from pf2lora_ray.algorithms.base import (
    AdamW,
    Algorithm,
    ClientRound,
    Local,
    Partition,
    Tensors,
    loss_and_grads,
    register,
)
from pf2lora_ray.lora import PERSONAL_FACTORS, SHARED_FACTORS, factor_names
from pf2lora_ray.tasks.base import Batch, Params, Task

# The four mini-batch streams of Algorithm 1, as purposes of the round's draws.
PI, XI, XI_TILDE, ZETA = seeds.LOWER, seeds.UPPER, seeds.UPPER_TILDE, seeds.HVP
# Personal-state entries of the persisted upper-level optimizer (not model parameters).
ADAM = "pf2lora.adam."


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
    """``shared_batches``: (F value, h = dF(theta, phi'(theta); zeta)/dtheta, phi') in one graph."""
    theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    phi_new = lower_level(task, model, theta, phi, xis, steps, beta, reg_lambda, unrolled)
    f_val, h = loss_and_grads(task, model, {**theta, **phi_new}, sorted(theta), zeta)
    return f_val, h, {k: v.detach() for k, v in phi_new.items()}


def split_batch(task: Task, batch: Batch, parts: int) -> list[tuple[float, Batch]]:
    """``batch`` as up to ``parts`` row slices, each with its share of the loss's mean.

    A task's loss is a mean over examples (or, for a task with a ``loss_weight``
    method, over what that counts, e.g. target tokens), so the mean over the
    batch is the share-weighted sum of the slices' means: exact, and each
    slice's autograd graph is a fraction of the whole batch's. Slices keep the
    batch's padding, so they see exactly the same inputs.
    """
    rows = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    bounds = [int(b) for b in torch.linspace(0, rows, min(parts, rows) + 1).round()]
    slices = [
        {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.shape[:1] == (rows,) else v
         for k, v in batch.items()}
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    weigh = getattr(task, "loss_weight", None)
    sizes = [weigh(b) if weigh else float(hi - lo)
             for b, lo, hi in zip(slices, bounds[:-1], bounds[1:], strict=True)]
    total = sum(sizes)
    return [(size / total, b) for size, b in zip(sizes, slices, strict=True) if size > 0]


def mixed_hvp(
    task: Task,
    model: nn.Module,
    theta: Tensors,
    phi: Tensors,
    v: Tensors,
    zeta: Batch,
    mode: str = "autograd",
    fd_eps: float = 1e-3,
    chunks: int = 1,
) -> Tensors:
    """grad2_xy F(theta, phi; zeta) @ v: how grad_theta F moves when phi moves along v.

    ``autograd``: grad_theta <grad_phi F, v> (double backward), over ``chunks``
    row slices of zeta in turn, summed by their share of the mean
    (:func:`split_batch`), so only one slice's double graph is alive at a time.
    ``finite_difference``: central difference of grad_theta F at phi +- eps v,
    eps = fd_eps / ||v|| (two plain passes; v = 0 gives 0).
    """
    x_names, y_names = sorted(theta), sorted(phi)
    zero = {k: torch.zeros_like(theta[k]) for k in x_names}
    if mode == "finite_difference":
        norm = float(torch.sqrt(sum((v[k].double() ** 2).sum() for k in y_names)))
        if norm == 0.0:
            return zero
        eps = fd_eps / norm
        shifted = lambda sign: {k: phi[k] + sign * eps * v[k] for k in y_names}  # noqa: E731
        _, g_plus = loss_and_grads(task, model, {**theta, **shifted(1.0)}, x_names, zeta)
        _, g_minus = loss_and_grads(task, model, {**theta, **shifted(-1.0)}, x_names, zeta)
        return {k: (g_plus[k] - g_minus[k]) / (2 * eps) for k in x_names}
    out = zero
    for share, part in split_batch(task, zeta, chunks):
        x = {k: t.detach().requires_grad_(True) for k, t in theta.items()}
        y = {k: t.detach().requires_grad_(True) for k, t in phi.items()}
        loss = task.loss(model, {**x, **y}, part)
        g_y = torch.autograd.grad(
            loss, [y[k] for k in y_names], create_graph=True, allow_unused=True
        )
        inner = sum((g * v[k]).sum() for k, g in zip(y_names, g_y, strict=True) if g is not None)
        if not isinstance(inner, torch.Tensor) or not inner.requires_grad:
            continue  # phi does not reach this loss: no mixed term
        grads = torch.autograd.grad(inner, [x[k] for k in x_names], allow_unused=True)
        out = {
            k: out[k] if g is None else out[k] + share * g
            for k, g in zip(x_names, grads, strict=True)
        }
    return out


def paper_step(
    task: Task,
    model: nn.Module,
    theta: Tensors,
    phi: Tensors,
    batches: dict[str, Batch],
    beta: float,
    second_order: bool = True,
    hvp: str = "autograd",
    fd_eps: float = 1e-3,
    hvp_chunks: int = 1,
) -> tuple[float, Tensors, Tensors]:
    """One step of Algorithm 1: (F(x, y+; xi), h, y+) from the batches pi, xi, xi~, zeta.

    ``second_order=False`` is the first-order ablation (h = grad_x F(x, y+; xi)).
    """
    theta = {k: v.detach() for k, v in theta.items()}
    phi = {k: v.detach() for k, v in phi.items()}
    x_names, y_names = sorted(theta), sorted(phi)
    _, g_y = loss_and_grads(task, model, {**theta, **phi}, y_names, batches[PI])
    phi_new = {k: phi[k] - beta * g_y[k] for k in y_names}
    f_val, h = loss_and_grads(task, model, {**theta, **phi_new}, x_names, batches[XI])
    if second_order and beta != 0.0:
        _, v = loss_and_grads(task, model, {**theta, **phi_new}, y_names, batches[XI_TILDE])
        mixed = mixed_hvp(task, model, theta, phi, v, batches[ZETA], hvp, fd_eps, hvp_chunks)
        h = {k: h[k] - beta * mixed[k] for k in x_names}
    return f_val, h, phi_new


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

    def local_update(self, client: ClientRound) -> Local:
        opts, task, model, theta = self.cfg.pf2lora, client.task, client.model, client.theta
        params, upper = split_state(client.phi), self.upper_optimizer(client.phi)
        second_order = opts.hypergrad == "unrolled"
        f_val = float("nan")
        if opts.estimator == "paper":
            # The first-order ablation uses only pi and xi: the other streams are not drawn.
            purposes = (PI, XI, XI_TILDE, ZETA) if second_order else (PI, XI)
            streams = {p: self.batches(client, p) for p in purposes}
            for _ in range(self.cfg.fed.local_steps):
                batches = {p: next(s) for p, s in streams.items()}
                f_val, h, params = paper_step(
                    task, model, theta, params, batches, opts.lr_lower, second_order,
                    opts.hvp, opts.fd_eps, opts.hvp_chunks,
                )
                theta = upper.step(theta, h)
        else:
            lower, upper_batches = self.batches(client, PI), self.batches(client, XI)
            for _ in range(self.cfg.fed.local_steps):
                f_val, h, params = hypergradient(
                    task, model, theta, params, lower, next(upper_batches), opts.lower_steps,
                    opts.lr_lower, opts.reg_lambda, unrolled=second_order,
                )
                theta = upper.step(theta, h)
        phi = {**params, **(optimizer_state(upper) if opts.upper_state == "persist" else {})}
        return Local(theta, phi, {"train_loss": f_val})

    def upper_optimizer(self, phi: Tensors) -> AdamW:
        """The upper-level AdamW: fresh (``reset``), or the client's persisted moments."""
        opt = AdamW(self.cfg.algorithm.lr, self.cfg.algorithm.weight_decay)
        if self.cfg.pf2lora.upper_state == "persist" and f"{ADAM}t" in phi:
            opt.t = int(phi[f"{ADAM}t"])
            for moment in ("m", "v"):
                prefix = f"{ADAM}{moment}."
                saved = {k.removeprefix(prefix): v for k, v in phi.items() if k.startswith(prefix)}
                setattr(opt, moment, saved)
        return opt

    def eval_params(self, client: ClientRound) -> Params:
        return {**client.theta, **split_state(client.phi)}

    def diagnostics(
        self, client: ClientRound, params: Params, metrics: dict[str, float] | None = None
    ) -> dict[str, float]:
        """The client's metrics with D_k = 0 (``<metric>.shared_only``) and ||C_k||, ||D_k||.

        Zeroing D_k removes the personal update s~ D_k C_k exactly; the head,
        when personal, stays as trained. When every D_k already is +0.0 bit for
        bit (a client that never trained) and ``metrics`` is given, the D_k = 0
        model is the evaluated one, so its metrics are ``metrics``.
        """
        personal = [v for k, v in params.items() if k.endswith(".lora_D")]
        if metrics is not None and all(is_plus_zero(v) for v in personal):
            # Same values in, same evaluation out (it is deterministic): no second pass.
            # Most clients of a large population never train, and this halves their cost.
            shared_only = metrics
        else:
            off = {k: torch.zeros_like(v) if k.endswith(".lora_D") else v
                   for k, v in params.items()}
            shared_only = client.task.evaluate(client.model, off, client.data)
        out = {f"{m}.shared_only": v for m, v in shared_only.items() if m != "majority_accuracy"}
        for factor in ("C", "D"):
            sq = sum(float((v.double() ** 2).sum()) for k, v in params.items()
                     if k.endswith(f".lora_{factor}"))
            out[f"norm_{factor}"] = sq**0.5
        return out


def is_plus_zero(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is +0.0 (bit for bit: -0.0 and NaN are not)."""
    return not bool(t.any()) and not bool(torch.signbit(t).any())


def split_state(phi: Tensors) -> Tensors:
    """The model parameters among a client's personal state (optimizer entries left out)."""
    return {k: v for k, v in phi.items() if not k.startswith(ADAM)}


def optimizer_state(opt: AdamW) -> Tensors:
    """AdamW moments and step count as personal-state tensors (checkpointed, moved whole)."""
    out = {f"{ADAM}m.{k}": v.detach() for k, v in opt.m.items()}
    out.update({f"{ADAM}v.{k}": v.detach() for k, v in opt.v.items()})
    device = next(iter(opt.m.values())).device if opt.m else None
    out[f"{ADAM}t"] = torch.tensor([opt.t], dtype=torch.int64, device=device)
    return out
