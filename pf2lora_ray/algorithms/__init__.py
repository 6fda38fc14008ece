"""Registered algorithms; importing this package fills :data:`ALGORITHMS`."""

from pf2lora_ray.algorithms import homlora, pf2lora  # noqa: F401  (register themselves)
from pf2lora_ray.algorithms.base import ALGORITHMS, Algorithm, RoundContext, register

__all__ = ["ALGORITHMS", "Algorithm", "RoundContext", "register"]
