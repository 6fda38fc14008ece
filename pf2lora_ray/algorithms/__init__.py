"""Registered algorithms; importing this package fills :data:`ALGORITHMS`."""

from pf2lora_ray.algorithms import (  # noqa: F401  (register themselves)
    centralized_lora,
    fedsa_lora,
    ffa_lora,
    hetlora,
    homlora,
    homlora_ft,
    local_lora,
    per_fedavg,
    pf2lora,
)
from pf2lora_ray.algorithms.base import ALGORITHMS, Algorithm, RoundContext, register

__all__ = ["ALGORITHMS", "Algorithm", "RoundContext", "register"]
