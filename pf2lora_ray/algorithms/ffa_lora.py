"""FFA-LoRA: federated LoRA with A frozen at its random initialisation, only B trained.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024.

A is drawn once from the run seed (theta_0), so every client holds the same A
without exchanging it; it stays in theta only so that every host evaluates the
same model, and its delta is exactly zero. Communicated: B (and the head when
``model.head: shared``), averaged by FedAvg -- :meth:`communicated_names`
leaves A out, so accounting counts B bytes only. Local: nothing (or the head
when ``model.head: personal``). Because A is fixed, averaging B averages the
product B A exactly, which is the paper's point.
"""

from __future__ import annotations

from pf2lora_ray.algorithms.base import (
    Algorithm,
    Partition,
    register,
)


def frozen(name: str) -> bool:
    """Whether ``name`` is a LoRA A factor (never trained by FFA-LoRA)."""
    return name.rsplit(".", 1)[-1] == "lora_A"


@register("ffa_lora")
class FFALoRA(Algorithm):
    """FedAvg on B (+ head); A frozen at the shared-seed init."""

    def trainable_names(self, roles: Partition) -> list[str]:
        return [n for n in super().trainable_names(roles) if not frozen(n)]

    def communicated_names(self, roles: Partition) -> list[str]:
        return [n for n in super().communicated_names(roles) if not frozen(n)]
