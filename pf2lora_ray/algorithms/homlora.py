"""HOMLoRA: FedAvg on LoRA factors (A, B) with one rank r for every client."""

from __future__ import annotations

from pf2lora_ray.algorithms.base import Algorithm, register


@register("homlora")
class HOMLoRA(Algorithm):
    """HOMLoRA: FedAvg on LoRA factors (A, B) with one rank r for every client.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (AISTATS 2017) applied to LoRA (Hu et al., ICLR 2022).
    Communicated: A, B (and the head when shared). Local: nothing (or the head
    when ``model.head: personal``). Everything is the :class:`Algorithm` default.
    """
