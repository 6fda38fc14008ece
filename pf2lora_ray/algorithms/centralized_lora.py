"""Centralized LoRA: the paper's reference row, one rank-r LoRA model trained on all clients' data.

Hao et al., arXiv:2503.03920, Table 1 ("centralized LoRA"); LoRA: Hu et al.,
ICLR 2022.

Through the same protocol as every federated method: each round one client
(client 0, :meth:`configure_round`) trains the shared A, B (and head) for
``fed.clients_per_round x fed.local_steps`` AdamW steps, the round's total
step count of a federated method, on mini-batches of the union of every
client's training split. The driver then takes its update whole (one
contribution: the weighted mean of one update is that update). Evaluation is
the usual one: the same model on each client's own test split. So it sees the
same data, the same number of parameter updates and the same evaluation as the
federated rows; what it does not have is heterogeneity, which is why it bounds
them (PF2LORA.md, Table 1).

As for every method here, the AdamW state starts afresh each round.
Communicated: nothing in a real deployment (the data are pooled); the
accounting still counts A, B once each way for the one training client.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from pf2lora_ray.algorithms.base import Algorithm, ClientRound, Local, register
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks.base import ClientData, Task

TRAINER = 0  # the client whose host trains the centralized model each round


def concat_splits(splits: list[Any]) -> Any:
    """One split holding every row of ``splits`` in order (a task's split dataclass).

    Fields are joined by type: lists and tuples are concatenated, numpy arrays
    and torch tensors along their first axis, dicts field by field, and None
    stays None. Works for every task's split type (rows + targets, x + y).
    """

    def join(values: list[Any]) -> Any:
        first = values[0]
        if first is None:
            return None
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        if isinstance(first, np.ndarray):
            return np.concatenate(values)
        if isinstance(first, (list, tuple)):
            return [x for v in values for x in v]
        if isinstance(first, dict):
            return {k: join([v[k] for v in values]) for k in first}
        raise TypeError(f"cannot pool a split field of type {type(first).__name__}")

    cls = type(splits[0])
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cannot pool splits of type {cls.__name__}: expected a dataclass")
    return cls(**{
        f.name: join([getattr(s, f.name) for s in splits]) for f in dataclasses.fields(cls)
    })


@register("centralized_lora")
class CentralizedLoRA(Algorithm):
    """One LoRA model of rank r on the pooled training data; evaluated on every client."""

    def __init__(self, cfg: Config) -> None:
        if cfg.model.head == "personal":
            raise ConfigError(
                "model.head: centralized_lora trains one model for every client; "
                "use model.head=shared"
            )
        super().__init__(cfg)
        self._pooled: ClientData | None = None

    def configure_round(self, round_: int, sampled: list[int]) -> list[int]:
        return [TRAINER]

    def pooled(self, task: Task) -> ClientData:
        """Every client's training split as one (built once per host)."""
        if self._pooled is None:
            clients = task.client_data(list(range(self.cfg.fed.num_clients)))
            train = concat_splits([clients[k].train for k in sorted(clients)])
            self._pooled = ClientData(TRAINER, train, None)
        return self._pooled

    def num_local_steps(self) -> int:
        """A federated round's total: ``fed.clients_per_round x fed.local_steps``."""
        return self.cfg.fed.clients_per_round * self.cfg.fed.local_steps

    def local_update(self, client: ClientRound) -> Local:
        """The plain AdamW local update, on the pooled data instead of the trainer's own.

        The driver takes the one update whole: ``aggregate`` divides the summed
        contribution by its weight, whatever ``fed.weighting`` gives it.
        """
        return super().local_update(dataclasses.replace(client, data=self.pooled(client.task)))
