"""FedSA-LoRA: share and average the A factors, keep the B factors (and the head) local.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025. The paper's finding is that A learns general knowledge
and B client-specific knowledge, so only A is aggregated.

Communicated: every adapted layer's A, averaged by FedAvg. Local: every B and
the task head, whatever ``model.head`` says (the head is client-specific too),
kept in the client's personal state and trained with A by AdamW. B starts at
zero on every client, so each client starts at the base model.
"""

from __future__ import annotations

from torch import nn

from pf2lora_ray.algorithms.base import Algorithm, Partition, register
from pf2lora_ray.lora import factor_names


@register("fedsa_lora")
class FedSALoRA(Algorithm):
    """FedAvg on A; B and head personal. Local training is the default AdamW loop."""

    def partition(self, model: nn.Module, head: list[str]) -> Partition:
        return Partition(
            shared=factor_names(model, ["lora_A"]),
            personal=sorted(factor_names(model, ["lora_B"]) + head),
        )
