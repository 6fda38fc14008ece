"""GLUE classification and regression (the paper's NLU experiments) behind the Task protocol.

A GLUE task is named by ``data.task`` (cola, sst2, mrpc, qqp, stsb, mnli, qnli,
rte, wnli); :data:`GLUE_TASKS` knows its text columns, label set and metrics, so
a user only says where the data are:

- ``data.name: glue`` with ``data.path`` at a GLUE-format folder (``train.tsv``,
  ``dev.tsv``; CoLA's TSVs have no header) or at CSV/JSON/Parquet files, or
  without ``data.path`` to load ``datasets.load_dataset("glue", task)`` from
  the Hugging Face hub (online users).
- ``data.name: csv | json | parquet`` with ``data.path`` at such a file (or a
  folder holding ``<split>.<ext>``); ``data.text_columns`` / ``data.label_column``
  override the column names for files that use other ones.

Local files are read with Hugging Face ``datasets`` (its offline ``csv`` builder
reads GLUE TSVs with quoting off, ``csv.QUOTE_NONE``, and CoLA's headerless TSV
with explicit column names). The split ``data.split`` (default ``train``) is
partitioned over clients by ``data.partition`` and each client's share is split
80/20 into its own train and test parts (:class:`~pf2lora_ray.tasks.text.ClientSplits`).

Metrics per client: the task's metrics (CoLA: mcc; MRPC/QQP: f1; STS-B:
pearson, spearman; accuracy for every classification task), ``loss``, and for
classification ``majority_accuracy``: the client's majority train label scored
on its test split, the baseline a personalized model must beat (PF2LORA.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pf2lora_ray import metrics
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks.base import Batch, ClientData, DataError, Params, register_task
from pf2lora_ray.tasks.text import (
    ClientSplits,
    Examples,
    find_split_file,
    header_fields,
    pad,
    param_device,
    quiet_loggers,
    read_table,
    truncation,
)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def models() -> Any:
    """:mod:`pf2lora_ray.models`, imported on first use: transformers takes seconds to
    import, and registering this task must not cost that to runs that never use it."""
    import pf2lora_ray.models

    return pf2lora_ray.models


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

_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": metrics.accuracy,
    "mcc": metrics.matthews_corrcoef,
    "f1": metrics.f1_binary,
    "pearson": metrics.pearson,
    "spearman": metrics.spearman,
}


@dataclass
class Table:
    """A split's texts (one list per text field) and targets, with where they came from."""

    texts: list[list[str]]
    targets: np.ndarray  # (n,) int64 class ids or float64 scores
    source: str


def _pick(columns: Sequence[str], accepted: Sequence[str], what: str, source: str) -> str:
    for name in accepted:
        if name in columns:
            return name
    raise DataError(
        f"{source}: no {what} column; expected one of {list(accepted)}, found {list(columns)} "
        "(set data.text_columns / data.label_column to use other names)"
    )


def encode_labels(raw: Sequence[Any], spec: GlueSpec, task: str, source: str) -> np.ndarray:
    """Class ids (or float scores) of ``raw``; a value outside the task's set names its row.

    A class may be given by name (``entailment``) or by id (``1`` or ``"1"``).
    """
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
                    f"{source}: row {i}: score {v!r} is not a {task} target; expected a number "
                    f"in [{lo:g}, {hi:g}]"
                )
        return out
    ids = {name: i for i, name in enumerate(spec.label_names)}
    ids.update({str(i): i for i in range(len(spec.label_names))})
    out = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        key = str(v).strip()
        if key not in ids:
            raise DataError(
                f"{source}: row {i}: label {v!r} is not a {task} label; expected one of "
                f"{list(spec.label_names)} or their ids 0..{len(spec.label_names) - 1}"
            )
        out[i] = ids[key]
    return out


@register_task("glue")
@register_task("csv")
@register_task("json")
@register_task("parquet")
class GlueTask:
    """Sentence(-pair) classification or regression on a GLUE task, per client.

    Args:
        cfg: the run's config; reads ``model.*`` and ``data.*``.

    Raises:
        ConfigError: ``data.task`` is not a GLUE task, or a file source lacks ``data.path``.
        DataError: the data path or split file is missing.
    """

    def __init__(self, cfg: Config) -> None:
        d = cfg.data
        if d.task not in GLUE_TASKS:
            raise ConfigError(
                f"data.task: {d.task!r} is not a GLUE task; choose one of {sorted(GLUE_TASKS)}"
            )
        self.cfg, self.name, self.spec = cfg, d.task, GLUE_TASKS[d.task]
        if d.text_columns and len(d.text_columns) != len(self.spec.text):
            raise ConfigError(
                f"data.text_columns: {d.task} has {len(self.spec.text)} text field(s), "
                f"got {list(d.text_columns)}"
            )
        if d.path is None and d.name != "glue":
            raise ConfigError(f"data.path: data.name={d.name} reads local files; set data.path")
        fmt = None if d.name == "glue" else d.name
        self.file = None if d.path is None else find_split_file(d.path, d.split, fmt)
        self.family = models().model_family(cfg.model)
        self._table: Table | None = None
        self._splits: ClientSplits | None = None
        self._tokenizer = None
        self._clients: dict[int, ClientData] = {}

    # ------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        model, self._tokenizer, self.family = models().load_model(
            self.cfg.model, "classification", self.spec.num_labels
        )
        return model

    def head_names(self, model: nn.Module) -> list[str]:
        """The classifier (BERT/RoBERTa ``classifier.*``, GPT-2/Llama ``score.*``)."""
        return sorted(
            n for n, _ in model.named_parameters() if n.startswith(("classifier.", "score."))
        )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = models().load_tokenizer(self.cfg.model)
        return self._tokenizer

    # ------------------------------------------------------------ data
    def table(self) -> Table:
        """The partitioned split, read once per task instance (i.e. once per host)."""
        if self._table is None:
            self._table = self._read()
        return self._table

    def _read(self) -> Table:
        d = self.cfg.data
        if self.file is None:
            ds, source = self._from_hub(), f"hub glue/{self.name} split {d.split}"
        else:
            names = None
            if self.spec.headerless and self.file.suffix in (".tsv", ".csv"):
                expected = {c for cols in self.spec.text for c in cols} | set(self.spec.label)
                if not expected & set(header_fields(self.file)):
                    names = self.spec.headerless
            ds, source = read_table(self.file, names), str(self.file)
        if ds.num_rows == 0:
            raise DataError(f"{source}: holds no rows")
        cols = ds.column_names
        text_cols = d.text_columns or tuple(
            _pick(cols, accepted, f"text field {i + 1}", source)
            for i, accepted in enumerate(self.spec.text)
        )
        label_col = _pick(
            cols, (d.label_column,) if d.label_column else self.spec.label, "label", source
        )
        for c in text_cols:
            _pick(cols, (c,), "text", source)
        texts = [["" if t is None else str(t) for t in ds[c]] for c in text_cols]
        return Table(texts, encode_labels(ds[label_col], self.spec, self.name, source), source)

    def _from_hub(self) -> Any:
        import datasets

        try:
            # Retries are logged as warnings; the DataError below says what failed.
            with quiet_loggers("huggingface_hub", "datasets"):
                return datasets.load_dataset("nyu-mll/glue", self.name, split=self.cfg.data.split)
        except (OSError, ValueError) as err:
            raise DataError(
                f"data.path is not set and glue/{self.name} could not be loaded from the hub "
                f"({err}); offline, point data.path at a GLUE-format folder"
            ) from err

    def partition_labels(self, table: Table) -> np.ndarray:
        """Labels the partitioner skews by: class ids, or STS-B scores binned to 0..4."""
        if self.spec.label_names is None:
            return np.clip(np.floor(table.targets), 0, 4).astype(np.int64)
        return table.targets

    def splits(self) -> ClientSplits:
        """The split's partition over all clients (drawn once per task instance)."""
        if self._splits is None:
            table = self.table()
            self._splits = ClientSplits(
                self.cfg, len(table.targets), self.partition_labels(table), source=table.source
            )
        return self._splits

    def check_data(self) -> dict[str, float]:
        """Partition check, then what ``data.max_length`` cuts of the rows clients use."""
        splits = self.splits()
        splits.check()
        table = self.table()
        rows = splits(range(self.cfg.fed.num_clients)).values()
        lengths = {}
        for i, split in enumerate(("train", "val", "test")):
            idx = np.concatenate([r[i] for r in rows])
            texts = [[field[j] for j in idx] for field in table.texts]
            ids = self.tokenizer(*texts, truncation=False)["input_ids"] if idx.size else []
            lengths[split] = np.array([len(x) for x in ids], dtype=np.int64)
        return truncation(lengths, self.cfg.data.max_length)

    def client_data(self, client_ids: Sequence[int]) -> dict[int, ClientData]:
        missing = [k for k in client_ids if k not in self._clients]
        if missing:
            table = self.table()
            splits = self.splits()(missing)
            for k, (train, val, test) in splits.items():
                tr, te = self._examples(table, train), self._examples(table, test)
                labels = None if self.spec.label_names is None else tr.targets
                va = self._examples(table, val) if val.size else None
                self._clients[k] = ClientData(k, tr, te, train_labels=labels, val=va)
        return {k: self._clients[k] for k in client_ids}

    def _examples(self, table: Table, idx: np.ndarray) -> Examples:
        texts = [[field[i] for i in idx] for field in table.texts]
        enc = self.tokenizer(*texts, truncation=True, max_length=self.cfg.data.max_length)
        keys = [k for k in MODEL_INPUTS if k in enc]
        rows = [{k: enc[k][j] for k in keys} for j in range(len(idx))]
        return Examples(rows, table.targets[idx])

    def batch(self, split: Examples, idx: np.ndarray) -> Batch:
        batch = pad([split.rows[i] for i in idx], self.tokenizer.pad_token_id)
        batch["target"] = torch.as_tensor(split.targets[idx])  # (batch,)
        return batch

    # ------------------------------------------------------------ loss and metrics
    def _outputs(
        self, model: nn.Module, params: Params, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (batch, num_labels) in a float dtype, target on the same device)."""
        device = param_device(dict(params))
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        logits = functional_call(model, dict(params), (), inputs, strict=False).logits
        if logits.dtype == torch.bfloat16:
            logits = logits.float()
        target = batch["target"].to(device)
        if self.spec.label_names is None:
            return logits[:, 0], target.to(logits.dtype)
        return logits, target

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy (classification) or mean squared error (STS-B)."""
        out, target = self._outputs(model, params, batch)
        if self.spec.label_names is None:
            return F.mse_loss(out, target)
        return F.cross_entropy(out, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, params: Params, data: ClientData) -> dict[str, float]:
        test, size = data.test, self.cfg.data.eval_batch_size
        preds, total = [], 0.0
        for start in range(0, len(test), size):
            batch = self.batch(test, np.arange(start, min(start + size, len(test))))
            out, target = self._outputs(model, params, batch)
            if self.spec.label_names is None:
                total += float(F.mse_loss(out, target, reduction="sum"))
                preds.append(out.cpu().double().numpy())
            else:
                total += float(F.cross_entropy(out, target, reduction="sum"))
                preds.append(out.argmax(-1).cpu().numpy())
        pred, target = np.concatenate(preds), test.targets
        result = {"loss": total / len(test)}
        names = self.spec.metrics
        if self.spec.label_names is not None:
            names = ("accuracy", *names)
            result["majority_accuracy"] = metrics.majority_accuracy(data.train_labels, target)
        result.update({m: _METRICS[m](pred, target) for m in names})
        return result
