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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pf2lora_ray import metrics
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks.base import (
    Batch,
    ClientData,
    ClientRows,
    DataError,
    Params,
    register_task,
)
from pf2lora_ray.tasks.glue_spec import GLUE_TASKS, Table, encode_labels, pick_column
from pf2lora_ray.tasks.text import (
    ClientSplits,
    Examples,
    SplitFile,
    find_split_file,
    header_fields,
    pad,
    param_device,
    quiet_loggers,
    take_rows,
    truncation,
)

__all__ = ["GLUE_TASKS", "GlueTask", "encode_labels"]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def models() -> Any:
    """:mod:`pf2lora_ray.models`, imported on first use: transformers takes seconds to
    import, and registering this task must not cost that to runs that never use it."""
    import pf2lora_ray.models

    return pf2lora_ray.models


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": metrics.accuracy,
    "mcc": metrics.matthews_corrcoef,
    "f1": metrics.f1_binary,
    "pearson": metrics.pearson,
    "spearman": metrics.spearman,
}


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
        self._file: SplitFile | Any = None  # a SplitFile, or the hub's Dataset
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
        """Every row of the split, read once per task instance (the driver's data check)."""
        if self._table is None:
            self._table = self._read()
        return self._table

    def _read(self, rows: np.ndarray | None = None) -> Table:
        """The split's rows ``rows`` (sorted positions; None: all), decoded and label-checked."""
        d = self.cfg.data
        if self._file is None:
            if self.file is None:
                self._file = self._from_hub()
            else:
                names = None
                if self.spec.headerless and self.file.suffix in (".tsv", ".csv"):
                    expected = {c for cols in self.spec.text for c in cols} | set(self.spec.label)
                    if not expected & set(header_fields(self.file)):
                        names = self.spec.headerless
                self._file = SplitFile(self.file, names)
        if self.file is None:
            source = f"hub glue/{self.name} split {d.split}"
            ds = self._file if rows is None else take_rows(self._file, rows, source)
        else:
            source = str(self.file)
            ds = self._file.table() if rows is None else self._file.rows(rows)
        if ds.num_rows == 0:
            raise DataError(f"{source}: holds no rows")
        cols = ds.column_names
        text_cols = d.text_columns or tuple(
            pick_column(cols, accepted, f"text field {i + 1}", source)
            for i, accepted in enumerate(self.spec.text)
        )
        label_col = pick_column(
            cols, (d.label_column,) if d.label_column else self.spec.label, "label", source
        )
        for c in text_cols:
            pick_column(cols, (c,), "text", source)
        texts = [["" if t is None else str(t) for t in ds[c]] for c in text_cols]
        targets = encode_labels(ds[label_col], self.spec, self.name, source, rows)
        return Table(texts, targets, source)

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

    def client_rows(self, client_ids: Sequence[int]) -> ClientRows:
        """Each client's rows of the split: the partition, drawn once per task instance."""
        return self.splits()(client_ids)

    def client_data(
        self, client_ids: Sequence[int], rows: ClientRows | None = None
    ) -> dict[int, ClientData]:
        """The clients' tokenized examples, built once per client and task instance.

        With ``rows``, only the union of the missing clients' rows is decoded,
        label-checked and tokenized (:class:`~pf2lora_ray.tasks.text.SplitFile`: a
        Parquet file reads their row groups, a TSV/CSV/JSON file is parsed whole once
        per instance); the partition is not drawn. Without, :meth:`table` reads every
        row and :meth:`client_rows` draws it.
        """
        missing = [k for k in client_ids if k not in self._clients]
        if missing:
            own = self.client_rows(missing) if rows is None else {k: rows[k] for k in missing}
            if self._table is not None:  # every row is decoded already
                table, at = self._table, lambda idx: idx
            else:
                wanted = np.unique(np.concatenate([i for k in missing for i in own[k]]))
                table, at = self._read(wanted), lambda idx: np.searchsorted(wanted, idx)
            for k in missing:
                train, val, test = (at(idx) for idx in own[k])
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
