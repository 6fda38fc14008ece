"""What each GLUE task's data look like: text columns, label set, metrics, label encoding.

:data:`GLUE_TASKS` maps a ``data.task`` name to its :class:`GlueSpec`;
:func:`encode_labels` turns a label column into class ids (or STS-B scores),
naming the file row of the first value outside the task's set. Used by
:class:`~pf2lora_ray.tasks.glue.GlueTask`, which reads and scores the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pf2lora_ray.tasks.base import DataError


@dataclass(frozen=True)
class GlueSpec:
    """What a GLUE task's data look like and how it is scored.

    Attributes:
        text: per text field, the accepted column names (hub name first, then
            the GLUE TSV name where it differs).
        label: accepted label column names.
        label_names: class names in label-id order; ``None`` = regression.
        metrics: task metrics besides ``loss`` (and ``accuracy`` for classification).
        headerless: column names of the task's headerless GLUE TSV files.
        score_range: allowed target range for regression.
    """

    text: tuple[tuple[str, ...], ...]
    label: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    headerless: tuple[str, ...] | None = None
    score_range: tuple[float, float] = (0.0, 5.0)

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_PAIR = (("sentence1",), ("sentence2",))
_NLI = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        (("sentence",),),
        ("label",),
        ("unacceptable", "acceptable"),
        ("mcc",),
        headerless=("source", "label", "original_mark", "sentence"),
    ),
    "sst2": GlueSpec((("sentence",),), ("label",), ("negative", "positive"), ()),
    "mrpc": GlueSpec(
        (("sentence1", "#1 String"), ("sentence2", "#2 String")),
        ("label", "Quality"),
        ("not_equivalent", "equivalent"),
        ("f1",),
    ),
    "qqp": GlueSpec(
        (("question1",), ("question2",)),
        ("label", "is_duplicate"),
        ("not_duplicate", "duplicate"),
        ("f1",),
    ),
    "stsb": GlueSpec(_PAIR, ("label", "score"), None, ("pearson", "spearman")),
    "mnli": GlueSpec(
        (("premise", "sentence1"), ("hypothesis", "sentence2")),
        ("label", "gold_label"),
        ("entailment", "neutral", "contradiction"),
        (),
    ),
    "qnli": GlueSpec((("question",), ("sentence",)), ("label",), _NLI, ()),
    "rte": GlueSpec(_PAIR, ("label",), _NLI, ()),
    "wnli": GlueSpec(_PAIR, ("label",), ("not_entailment", "entailment"), ()),
}


@dataclass
class Table:
    """A split's texts (one list per text field) and targets, with where they came from."""

    texts: list[list[str]]
    targets: np.ndarray  # (n,) int64 class ids or float64 scores
    source: str


def pick_column(columns: Sequence[str], accepted: Sequence[str], what: str, source: str) -> str:
    """The first of ``accepted`` among ``columns``; none there is a DataError naming both."""
    for name in accepted:
        if name in columns:
            return name
    raise DataError(
        f"{source}: no {what} column; expected one of {list(accepted)}, found {list(columns)} "
        "(set data.text_columns / data.label_column to use other names)"
    )


def encode_labels(
    raw: Sequence[Any], spec: GlueSpec, task: str, source: str, rows: np.ndarray | None = None
) -> np.ndarray:
    """Class ids (or float scores) of ``raw``; a value outside the task's set names its row.

    A class may be given by name (``entailment``) or by id (``1`` or ``"1"``).
    ``rows``: the file row of each value, for messages (default: its position).
    """
    row = np.arange(len(raw)) if rows is None else rows
    if spec.label_names is None:
        lo, hi = spec.score_range
        out = np.empty(len(raw), dtype=np.float64)
        for i, v in enumerate(raw):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                out[i] = np.nan
            if not lo <= out[i] <= hi:
                raise DataError(
                    f"{source}: row {row[i]}: score {v!r} is not a {task} target; "
                    f"expected a number in [{lo:g}, {hi:g}]"
                )
        return out
    ids = {name: i for i, name in enumerate(spec.label_names)}
    ids.update({str(i): i for i in range(len(spec.label_names))})
    out = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        key = str(v).strip()
        if key not in ids:
            raise DataError(
                f"{source}: row {row[i]}: label {v!r} is not a {task} label; expected one of "
                f"{list(spec.label_names)} or their ids 0..{len(spec.label_names) - 1}"
            )
        out[i] = ids[key]
    return out
