"""The algorithm protocol and its registry.

An algorithm is a small class with three hooks (after pfl-research and Flower):

- :meth:`Algorithm.local_update` runs on a client: given its :class:`ClientRound`
  (the shared state theta received this round, the client's personal state phi,
  its data and the round's context) it returns the new (theta, phi). Only
  theta's contribution leaves the client.
- :meth:`Algorithm.contribution` turns one client's result into a weighted
  summand; hosts pre-sum these over their clients.
- :meth:`Algorithm.aggregate` runs on the driver: sum of contributions -> next theta.

Every client-side hook takes the client's round as one frozen
:class:`ClientRound` value, as pfl-research hands its algorithms one context.

Which parameters are shared, personal or frozen is declared by
:meth:`Algorithm.partition`, so client hosts, checkpoints and the PEFT export
treat every algorithm alike. Algorithms register with ``@register("name")``;
nothing else switches on algorithm names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from pf2lora_ray import seeds

if TYPE_CHECKING:
    from pf2lora_ray.config import Config
    from pf2lora_ray.tasks.base import Batch, ClientData, Params, Task

Tensors = dict[str, torch.Tensor]

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make ``cls`` available as ``algorithm.name: <name>``."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class Partition:
    """Parameter names by role. Every trainable name is in exactly one list."""

    shared: list[str]
    personal: list[str]


@dataclass(frozen=True)
class RoundContext:
    """Everything random in a client's round derives from (seed, round, client)."""

    seed: int
    round: int
    client_id: int

    def rng(self, purpose: str | int = seeds.BATCHES, *ids: int) -> np.random.Generator:
        """The stream (seed, purpose, round, client, *ids) (:mod:`pf2lora_ray.seeds`).

        ``purpose`` names what the draws are for (``"lower"``, ``"upper"``, ...);
        an int is a numbered batch stream (``seeds.STREAM``).
        """
        return seeds.rng(self.seed, *self._name(purpose, ids))

    def torch_generator(self, purpose: str | int = seeds.BATCHES, *ids: int) -> torch.Generator:
        """A torch generator for the same stream as :meth:`rng`."""
        return seeds.torch_generator(self.seed, *self._name(purpose, ids))

    def _name(self, purpose: str | int, ids: tuple[int, ...]) -> tuple:
        if isinstance(purpose, int):
            purpose, ids = seeds.STREAM, (purpose, *ids)
        return (purpose, self.round, self.client_id, *ids)


@dataclass(frozen=True)
class ClientRound:
    """One client's round, as every client-side hook of :class:`Algorithm` receives it.

    Attributes:
        task: the task (loss, batches, evaluation).
        model: the host's frozen base model with two-level LoRA; parameters are
            passed to it by name, never written into it.
        theta: the shared state received this round (theta_t), by parameter name.
        phi: the client's personal state (model parameters and any extra state
            from :meth:`Algorithm.init_personal`).
        data: the client's data. For :meth:`Algorithm.diagnostics`, the split being
            scored stands in the ``test`` place (``ClientData.for_split``).
        ctx: the round's context; every random draw comes from it.

    Hooks read theta and phi and return new dicts and tensors; they never write
    into them (the host's state and :meth:`Algorithm.contribution`'s theta_t are
    these very tensors).
    """

    task: Task
    model: nn.Module
    theta: Tensors
    phi: Tensors
    data: ClientData
    ctx: RoundContext

    @property
    def params(self) -> Tensors:
        """theta and phi as one name-keyed dict (phi wins on a shared name; names are disjoint)."""
        return {**self.theta, **self.phi}


class BatchStream:
    """Mini-batches of one client's train split: shuffled epochs, reproducible."""

    def __init__(self, task: Task, data: ClientData, batch_size: int, rng: np.random.Generator):
        self.task, self.data, self.rng = task, data, rng
        self.batch_size = min(batch_size, data.num_train)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if len(self._order) < self.batch_size:
            self._order = np.concatenate([self._order, self.rng.permutation(self.data.num_train)])
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.task.batch(self.data.train, np.sort(idx))


@dataclass
class Local:
    """What a client's local update hands back to its host."""

    theta: Tensors
    phi: Tensors
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm:
    """Base class: FedAvg over the shared names, AdamW locally (override what differs).

    Subclasses set ``name`` through ``@register`` and override the hooks they need.
    """

    name: ClassVar[str] = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ------------------------------------------------ model shape and roles
    def ranks(self) -> tuple[int, int]:
        """(shared rank, personal rank) of the two-level layers this algorithm trains."""
        return self.cfg.adapter.r, 0

    def partition(self, model: nn.Module, head: list[str]) -> Partition:
        """Default: A, B (and the head when ``model.head: shared``) shared; nothing personal."""
        from pf2lora_ray.lora import SHARED_FACTORS, factor_names

        lora = factor_names(model, SHARED_FACTORS)
        if self.cfg.model.head == "shared":
            return Partition(shared=sorted(lora + head), personal=[])
        return Partition(shared=lora, personal=sorted(head))

    def init_personal(self, model: nn.Module, phi: Tensors, client_id: int) -> Tensors:
        """Client ``client_id``'s first personal state, given fresh ``partition().personal``.

        Override to add state that is not a model parameter (HetLoRA keeps its
        client rank here). Entries must be tensors so checkpoints store them.
        Default: ``phi`` unchanged.
        """
        return phi

    # ------------------------------------------------ accounting
    def trainable_names(self, roles: Partition) -> list[str]:
        """Parameters a client trains (default: every shared and personal one)."""
        return sorted(roles.shared + roles.personal)

    def communicated_names(self, roles: Partition) -> list[str]:
        """Parameters sent each way each round by a sampled client (default: the shared ones)."""
        return sorted(roles.shared)

    # ------------------------------------------------ client side
    def local_update(self, client: ClientRound) -> Local:
        """:meth:`num_local_steps` AdamW steps on :meth:`trainable_names` (plain local training)."""
        trainable = self.trainable_names(Partition(sorted(client.theta), sorted(client.phi)))
        loss, params = self.adamw(client, client.params, trainable, self.num_local_steps())
        theta = {k: params[k] for k in client.theta}
        return Local(theta, {k: params[k] for k in client.phi}, {"train_loss": loss})

    def eval_params(self, client: ClientRound) -> Params:
        """The parameters client k is evaluated with (default: theta and its phi)."""
        return client.params

    def diagnostics(
        self, client: ClientRound, params: Params, metrics: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Extra per-client metrics of ``params`` on ``client.data`` (default: none).

        ``params`` is what :meth:`eval_params` returned for ``client``. PF2LoRA
        reports its personal level's contribution here. ``metrics``, when given,
        must be ``task.evaluate(model, params, client.data)``, already computed by
        the caller: a diagnostic that would compute it again may reuse it.
        """
        return {}

    def num_local_steps(self) -> int:
        """Parameter updates a training client makes per round (default ``fed.local_steps``)."""
        return self.cfg.fed.local_steps

    def configure_round(self, round_: int, sampled: list[int]) -> list[int]:
        """The clients that train in round ``round_``, given the driver's sample (default: all).

        ``centralized_lora`` overrides it: one client trains on the pooled data.
        """
        return sampled

    def weight(self, data: ClientData) -> float:
        """p_k: 1 (``fed.weighting: uniform``, the paper's 1/M) or n_k (``examples``)."""
        return float(data.num_train) if self.cfg.fed.weighting == "examples" else 1.0

    def contribution(self, client: ClientRound, local: Local) -> tuple[float, Tensors]:
        """(weight p_k, delta_k = theta_k - theta_t) for the weighted FedAvg mean.

        ``client`` is the round ``local`` came from: ``client.theta`` is theta_t.
        """
        delta = {k: local.theta[k] - client.theta[k] for k in client.theta}
        return self.weight(client.data), delta

    # ------------------------------------------------ driver side
    def aggregate(
        self, theta: dict[str, np.ndarray], summed: dict[str, np.ndarray], total_weight: float
    ) -> dict[str, np.ndarray]:
        """theta + eta_g * sum_k p_k delta_k / sum_k p_k (FedAvg when eta_g = 1)."""
        if total_weight <= 0:
            return theta
        lr = self.cfg.fed.server_lr
        return {
            k: (theta[k] + lr * summed[k] / total_weight).astype(theta[k].dtype)
            for k in sorted(theta)
        }

    # ------------------------------------------------ helpers for subclasses
    def batches(self, client: ClientRound, stream: str | int = seeds.BATCHES) -> BatchStream:
        """The client's mini-batches for one purpose (``stream``) of its round."""
        return BatchStream(
            client.task, client.data, self.cfg.data.batch_size, client.ctx.rng(stream)
        )

    def adamw(
        self,
        client: ClientRound,
        params: Tensors,
        names: list[str],
        steps: int,
        stream: str | int = seeds.BATCHES,
    ) -> tuple[float, Tensors]:
        """:func:`adamw_steps` on the client's batches of ``stream``, lr ``algorithm.lr``."""
        return adamw_steps(
            client.task, client.model, params, names, self.batches(client, stream), steps,
            self.cfg.algorithm.lr, self.cfg.algorithm.weight_decay,
        )


def loss_and_grads(
    task: Task,
    model: nn.Module,
    params: Tensors,
    names: list[str],
    batch: Batch,
    create_graph: bool = False,
) -> tuple[float, Tensors]:
    """Loss value and its gradients w.r.t. ``params[names]`` (leaves are made if needed)."""
    leaves = {
        k: (v if v.requires_grad else v.detach().requires_grad_(True)) for k, v in params.items()
    }
    loss = task.loss(model, leaves, batch)
    grads = torch.autograd.grad(
        loss, [leaves[k] for k in names], create_graph=create_graph, allow_unused=True
    )
    out = {
        k: (torch.zeros_like(leaves[k]) if g is None else g)
        for k, g in zip(names, grads, strict=True)
    }
    return float(loss.detach()), out


def adamw_steps(
    task: Task,
    model: nn.Module,
    params: Tensors,
    names: list[str],
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
) -> tuple[float, Tensors]:
    """``steps`` AdamW steps on ``params[names]``, the other entries held fixed.

    Returns (loss of the last step, NaN when ``steps`` is 0; updated detached params).
    """
    params = {k: v.detach() for k, v in params.items()}
    opt, loss = AdamW(lr, weight_decay), float("nan")
    for _ in range(steps):
        loss, grads = loss_and_grads(task, model, params, names, next(batches))
        params = opt.step(params, grads)
    return loss, params


class AdamW:
    """AdamW (Loshchilov & Hutter) on name-keyed tensors, state kept as name-keyed tensors.

    Written out (a dozen lines) rather than ``torch.optim.AdamW`` because our
    parameters are plain dict entries passed through ``functional_call`` and
    replaced functionally each step, and the state must serialise by name.
    """

    def __init__(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.t = 0
        self.m: Tensors = {}
        self.v: Tensors = {}

    @torch.no_grad()
    def step(self, params: Tensors, grads: Tensors) -> Tensors:
        """Return updated copies of ``params`` for the names in ``grads``; others unchanged."""
        self.t += 1
        b1, b2 = self.betas
        out = dict(params)
        for k, g in grads.items():
            m = self.m.get(k, torch.zeros_like(g)).mul(b1).add(g, alpha=1 - b1)
            v = self.v.get(k, torch.zeros_like(g)).mul(b2).addcmul(g, g, value=1 - b2)
            self.m[k], self.v[k] = m, v
            m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
            p = params[k].detach() * (1 - self.lr * self.wd)
            out[k] = p - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return out


def sgd_step(params: Tensors, grads: Tensors, lr: float) -> Tensors:
    """phi - lr * grad, keeping the autograd graph (used inside the unrolled lower level)."""
    out = dict(params)
    for k, g in grads.items():
        out[k] = params[k] - lr * g
    return out
