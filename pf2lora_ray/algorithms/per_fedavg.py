"""Per-FedAvg over the LoRA parameters (first-order and Hessian-free variants).

Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020 (Algorithm 1).

Communicated: A, B (and the head when ``model.head: shared``); the driver
averages the deltas (FedAvg). Local: nothing between rounds (or the head when
``model.head: personal``, which is meta-trained alongside).

One local step on w = (theta, phi), repeated ``fed.local_steps`` times, with
alpha = ``per_fedavg.lr_inner`` and beta = ``algorithm.lr``::

    temp = w - alpha * grad f(w; D)                       # inner (personalisation) step
    g    = grad f(temp; D')
    FO:  w <- w - beta * g
    HF:  w <- w - beta * (g - alpha * d),
         d = [grad f(w + delta g; D'') - grad f(w - delta g; D'')] / (2 delta)

The HF variant estimates the Hessian-vector product grad^2 f(w; D'') g by the
paper's central finite difference with ``per_fedavg.delta`` (no double
backward). The outer step is plain SGD with ``algorithm.lr``, as in the paper
(``per_fedavg.outer: sgd``): tune ``algorithm.lr`` for it on SGD's scale.
``per_fedavg.outer: adamw`` passes the same meta-gradient g to AdamW instead,
the optimizer every other method (and PF2LoRA's upper level) uses locally.
D, D', D'' are independent mini-batch streams of the client's train split.

Evaluation personalises as the paper does: one step of ``lr_inner`` from the
received model on one train batch (a stream distinct from training's).
"""

from __future__ import annotations

import torch

from pf2lora_ray import seeds
from pf2lora_ray.algorithms.base import (
    AdamW,
    Algorithm,
    ClientRound,
    Local,
    Tensors,
    loss_and_grads,
    register,
)
from pf2lora_ray.tasks.base import Params


@torch.no_grad()
def axpy(x: Tensors, y: Tensors, a: float) -> Tensors:
    """x + a * y for the names in ``y``; other entries of ``x`` unchanged."""
    return {k: (x[k] + a * y[k]) if k in y else x[k] for k in x}


@register("per_fedavg")
class PerFedAvg(Algorithm):
    """MAML-style local steps (FO or HF) on the LoRA parameters, FedAvg on the driver."""

    def local_update(self, client: ClientRound) -> Local:
        opts, task, model = self.cfg.per_fedavg, client.task, client.model
        alpha, beta = opts.lr_inner, self.cfg.algorithm.lr
        # Three batch streams of the round: inner step, outer gradient, Hessian-free product.
        d, d1, d2 = (self.batches(client, s) for s in (0, 1, 2))
        w = {k: v.detach() for k, v in client.params.items()}
        names = sorted(w)
        loss = float("nan")
        adamw = AdamW(beta, self.cfg.algorithm.weight_decay) if opts.outer == "adamw" else None
        for _ in range(self.cfg.fed.local_steps):
            _, g_in = loss_and_grads(task, model, w, names, next(d))
            temp = axpy(w, g_in, -alpha)
            loss, g = loss_and_grads(task, model, temp, names, next(d1))
            if opts.variant == "hessian_free":
                batch = next(d2)
                _, g_plus = loss_and_grads(task, model, axpy(w, g, opts.delta), names, batch)
                _, g_minus = loss_and_grads(task, model, axpy(w, g, -opts.delta), names, batch)
                hvp = {k: (g_plus[k] - g_minus[k]) / (2 * opts.delta) for k in names}
                g = axpy(g, hvp, -alpha)
            w = adamw.step(w, g) if adamw else axpy(w, g, -beta)
        theta, phi = {k: w[k] for k in client.theta}, {k: w[k] for k in client.phi}
        return Local(theta, phi, {"train_loss": loss})

    def eval_params(self, client: ClientRound) -> Params:
        w = {k: v.detach() for k, v in client.params.items()}
        batch = next(self.batches(client, seeds.EVAL_STEP))
        _, g = loss_and_grads(client.task, client.model, w, sorted(w), batch)
        return axpy(w, g, -self.cfg.per_fedavg.lr_inner)
