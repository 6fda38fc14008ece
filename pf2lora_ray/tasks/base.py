"""The task protocol: what a client needs to know about a model and its data.

A task turns a :class:`~pf2lora_ray.config.Config` into a frozen base model (with
two-level LoRA injected), each client's train/test examples, a loss and an
evaluation. Algorithms never see the data format: they call :meth:`Task.loss`
with name-keyed parameters and a batch.

Tasks are found by name in :data:`TASKS` (``@register_task``), chosen from
``data.name`` / ``data.task`` by :func:`pf2lora_ray.tasks.task_for`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

Params = Mapping[str, torch.Tensor]
Batch = dict[str, Any]


class Rows(NamedTuple):
    """One client's rows of the task's split file: sorted int64 positions (0-based, header
    not counted) of the rows its ``train``, ``val`` and ``test`` examples are built from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


ClientRows = dict[int, Rows]


@dataclass
class ClientData:
    """One client's examples. ``train``/``val``/``test`` are sized objects the task can batch.

    ``val`` (None when ``data.val_fraction`` is 0) is carved from the training share and
    never trained on; evaluation scores it like ``test`` (see :meth:`for_split`).
    """

    client_id: int
    train: Any  # sized, batched by Task.batch
    test: Any
    true_rank: int | None = None
    train_labels: np.ndarray | None = None
    val: Any = None

    def for_split(self, split: str) -> ClientData:
        """This client with ``split``'s rows in the place :meth:`Task.evaluate` scores."""
        return self if split == "test" else dataclasses.replace(self, test=getattr(self, split))

    def eval_splits(self) -> list[str]:
        """The splits evaluation scores: ``val`` when the client has validation rows, ``test``."""
        return (["val"] if self.val is not None and len(self.val) else []) + ["test"]

    @property
    def num_train(self) -> int:
        return len(self.train)


class Task(Protocol):
    """What the client code needs from a task."""

    family: str  # model family, picks default adapter targets ("bert", "gpt2", "synthetic"...)

    def build_model(self) -> nn.Module:
        """The frozen base model (adapters are injected by the caller)."""

    def head_names(self, model: nn.Module) -> list[str]:
        """Names of trainable task-head parameters (empty when there is none)."""

    def check_data(self) -> dict[str, float] | None:
        """Read the data and split them over all ``fed.num_clients`` clients, as hosts will.

        Called on the driver before a run starts (:mod:`pf2lora_ray.validate`), so a
        missing file, a bad label or too few rows stops the run before anything is
        written. Cheap: no model (text tasks load the tokenizer to measure lengths).

        Returns:
            What the check measured, recorded in runs.parquet (``data_check.*``): text
            tasks give ``truncated.<split>``, the share of each split's examples that
            ``data.max_length`` cuts, and ``length_p95``; None when there is nothing.

        Raises:
            DataError, PartitionError, ConfigError: naming the file, row or key.
        """

    def client_rows(self, client_ids: Sequence[int]) -> ClientRows | None:
        """Each given client's :class:`Rows`: the partition of the split, drawn from the seed.

        The driver calls it once, after :meth:`check_data`, and hands every host only
        its own clients' rows (:func:`pf2lora_ray.validate.validate_run`). None for a
        task that generates each client's data from (seed, client) and reads no file.
        """

    def client_data(
        self, client_ids: Sequence[int], rows: ClientRows | None = None
    ) -> dict[int, ClientData]:
        """Train/val/test examples of the given clients (deterministic from the seed).

        With ``rows`` (:meth:`client_rows` of at least these clients) the examples are
        built from exactly those rows, without drawing the partition; without, the task
        draws it itself. Both give equal data.
        """

    def batch(self, split: Any, idx: np.ndarray) -> Batch:
        """Rows ``idx`` of a client's split (``ClientData.train``/``test``) as tensors."""

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """Mean training loss of ``model`` run with ``params`` substituted."""

    def evaluate(self, model: nn.Module, params: Params, data: ClientData) -> dict[str, float]:
        """Metrics of the client's personalized model on ``data.test``.

        The client scores its validation rows through the same call with
        ``data.for_split("val")``, so a task scores whatever ``data.test`` holds.
        """


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator adding a task constructor ``cls(cfg)`` to :data:`TASKS`."""

    def deco(cls: type) -> type:
        TASKS[name] = cls
        return cls

    return deco


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DataError(ValueError):
    """A data file or folder is missing or malformed; the message names it and the fix."""
