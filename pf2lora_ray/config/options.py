"""Options of single algorithms (``pf2lora``, ``finetune``, ``per_fedavg``, ``hetlora``).

They would read best next to each algorithm's module, but ``pf2lora_ray.algorithms``
imports torch, and a config must build without it (see :mod:`pf2lora_ray.config`);
so they live here, one dataclass per algorithm, each naming the module it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pf2lora_ray.config.errors import check


@dataclass(frozen=True)
class PF2LoRAConfig:
    """PF2LoRA bilevel options (PF2LORA.md, "What the paper prints", Algorithm 1).

    - ``hypergrad``: ``unrolled`` (the bilevel hypergradient) or ``first_order``
      (grad_x F at the new y only: the "without bilevel" ablation).
    - ``estimator``: ``paper`` draws four independent mini-batches pi, xi, xi~,
      zeta per step and takes the mixed term at the old y on zeta in its own
      pass; ``shared_batches`` reuses one lower batch and one upper batch and
      differentiates through the lower step in one graph (the first version).
    - ``hvp``: how ``paper`` computes grad2_xy F(x, y; zeta) @ v: ``autograd``
      (double backward) or ``finite_difference`` (central difference of
      grad_x F at y +- eps v, eps = ``fd_eps`` / ||v||). ``hvp_chunks``: the
      autograd product runs over that many row slices of zeta in turn (exact;
      the double-backward graph of half a batch instead of a whole one).
    - ``lr_lower`` is beta, the lower-level SGD step; tune it like any rate.
    - ``upper_state``: ``reset`` starts the upper AdamW moments afresh each
      round; ``persist`` keeps each client's moments for A, B (and a shared
      head) in its personal state, 2x the shared parameters per client.
    """

    hypergrad: Literal["unrolled", "first_order"] = "unrolled"
    estimator: Literal["paper", "shared_batches"] = "paper"
    hvp: Literal["autograd", "finite_difference"] = "autograd"
    fd_eps: float = 1e-3
    hvp_chunks: int = 2
    lr_lower: float = 0.1
    lower_steps: int = 1
    reg_lambda: float = 0.0
    upper_state: Literal["reset", "persist"] = "reset"

    def __post_init__(self) -> None:
        check(self.lr_lower >= 0, "pf2lora.lr_lower", f"must be >= 0, got {self.lr_lower}")
        check(self.lower_steps >= 1, "pf2lora.lower_steps", "must be >= 1")
        check(self.reg_lambda >= 0, "pf2lora.reg_lambda", "must be >= 0")
        check(self.fd_eps > 0, "pf2lora.fd_eps", f"must be > 0, got {self.fd_eps}")
        check(self.hvp_chunks >= 1, "pf2lora.hvp_chunks", f"must be >= 1, got {self.hvp_chunks}")
        check(
            self.estimator == "shared_batches" or self.lower_steps == 1,
            "pf2lora.lower_steps",
            "the paper estimator takes one lower step (Algorithm 1); use "
            "pf2lora.estimator=shared_batches for J > 1",
        )


@dataclass(frozen=True)
class FinetuneConfig:
    """``homlora_ft``: local fine-tuning steps on the global model before evaluation."""

    steps: int = 10

    def __post_init__(self) -> None:
        check(self.steps >= 0, "finetune.steps", "must be >= 0")


@dataclass(frozen=True)
class PerFedAvgConfig:
    """``per_fedavg`` (Fallah et al. 2020) over the LoRA parameters.

    ``outer`` is the meta (outer) update: ``sgd`` (the paper's w <- w - beta * g,
    ``algorithm.lr`` on SGD's scale) or ``adamw`` (the same meta-gradient g through
    AdamW with ``algorithm.lr`` and ``algorithm.weight_decay``, moments fresh each
    round, as every other method's local optimizer).
    """

    variant: Literal["first_order", "hessian_free"] = "first_order"
    outer: Literal["sgd", "adamw"] = "sgd"
    lr_inner: float = 1e-2
    delta: float = 1e-3

    def __post_init__(self) -> None:
        check(self.lr_inner >= 0, "per_fedavg.lr_inner", "must be >= 0")
        check(self.delta > 0, "per_fedavg.delta", "must be > 0")


@dataclass(frozen=True)
class HetLoRAConfig:
    """``hetlora`` (Cho et al. 2024): client ranks in [r_min, r_max], self-pruning."""

    r_min: int = 2
    r_max: int = 8
    gamma: float = 0.99
    reg: float = 1e-2

    def __post_init__(self) -> None:
        check(self.r_min >= 1, "hetlora.r_min", "must be >= 1")
        check(self.r_max >= self.r_min, "hetlora.r_max", "must be >= hetlora.r_min")
        check(0 < self.gamma <= 1, "hetlora.gamma", "must be in (0, 1]")
        check(self.reg >= 0, "hetlora.reg", "must be >= 0")
