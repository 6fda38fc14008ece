"""Local-only LoRA: every client trains its own adapter of rank r + r~; nothing is shared.

The no-federation baseline of PF2LORA.md (Baselines): LoRA (Hu et al., "LoRA:
Low-Rank Adaptation of Large Language Models", ICLR 2022) trained on each
client's own data alone, at rank r + r~ so that it has PF2LoRA's per-client
capacity.

Communicated: nothing (theta is empty; the driver's aggregate leaves it empty).
Local: A, B and the head. A is drawn per client from (seed, client) by the
client host, B starts at zero; training is the default AdamW loop.
"""

from __future__ import annotations

from torch import nn

from pf2lora_ray.algorithms.base import Algorithm, Partition, register
from pf2lora_ray.lora import SHARED_FACTORS, factor_names


@register("local_lora")
class LocalLoRA(Algorithm):
    """Personal rank-(r + r~) LoRA per client, no communication."""

    def ranks(self) -> tuple[int, int]:
        return self.cfg.adapter.r + self.cfg.adapter.r_personal, 0

    def partition(self, model: nn.Module, head: list[str]) -> Partition:
        return Partition(shared=[], personal=sorted(factor_names(model, SHARED_FACTORS) + head))
