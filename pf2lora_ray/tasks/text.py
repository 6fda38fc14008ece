"""Helpers shared by the text tasks: reading data files, client splits, padding.

- :func:`find_split_file` / :func:`read_table`: a split of a local dataset
  (TSV/CSV/JSON/Parquet) read with Hugging Face ``datasets`` (its packaged
  ``csv``/``json``/``parquet`` builders work offline).
- :class:`ClientSplits`: the partition of a split over all ``fed.num_clients``
  clients (:mod:`pf2lora_ray.data.partition`), drawn once per task, then each
  client's own 80/20 train/test split and deterministic subsampling. The driver
  draws it once, while it checks the data before a run, and hands each host its
  own clients' :class:`~pf2lora_ray.tasks.base.Rows`; a host given them reads
  only those rows (:func:`read_table` with ``rows``) and never draws it again.
- :class:`Examples` and :func:`pad`: tokenized rows kept as lists of token ids,
  padded per batch to the longest row (dynamic padding).
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pf2lora_ray import seeds
from pf2lora_ray.config import Config
from pf2lora_ray.data.partition import (
    PartitionError,
    partition,
    split_off_validation,
    split_train_test,
)
from pf2lora_ray.storage import Location, cached_copy, location
from pf2lora_ray.tasks.base import Batch, ClientRows, DataError, Rows

FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def find_split_file(path: str | Path, split: str, fmt: str | None = None) -> Path:
    """The file holding ``split`` under ``path`` (a file, or a folder with ``<split>.<ext>``).

    ``path`` may be a URI (``s3://bucket/glue/SST-2``): the split's file is then
    copied to a local cache on first use (:func:`pf2lora_ray.storage.cached_copy`).

    Raises:
        DataError: the path does not exist, or the folder has no file for the split.
    """
    p = location(path)
    if p.is_file():
        return _local(p)
    if not p.is_dir():
        raise DataError(f"data.path: {p} does not exist; point it at a data folder or file")
    exts = [e for e, f in FORMATS.items() if fmt is None or f == fmt]
    for ext in exts:
        if (p / f"{split}{ext}").is_file():
            return _local(p / f"{split}{ext}")
    raise DataError(
        f"data.path: {p} has no {split} file; expected one of "
        f"{[f'{split}{e}' for e in exts]} (choose the split with data.split)"
    )


def _local(file: Location) -> Path:
    """A local path for ``file``: as the user wrote it, or a cached download of a URI."""
    return Path(file.uri) if file.is_local else cached_copy(file)


def header_fields(file: Path) -> list[str]:
    """Fields of a TSV/CSV file's first line (to detect a missing header)."""
    with open(file, newline="", encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n")
    return first.split("\t" if file.suffix == ".tsv" else ",")


def read_table(file: Path, column_names: Sequence[str] | None = None) -> Any:
    """A ``datasets.Dataset`` of ``file`` (TSV/CSV/JSON/JSONL/Parquet), held in memory.

    TSV files are read with quoting off (``csv.QUOTE_NONE``) because GLUE TSVs
    contain unbalanced quote characters. ``column_names`` gives the names of a
    headerless TSV/CSV (CoLA).

    Raises:
        DataError: the file cannot be parsed (the message names it).
    """
    import datasets

    builder = FORMATS.get(file.suffix)
    if builder is None:
        raise DataError(f"{file}: unknown file type {file.suffix!r}; use one of {sorted(FORMATS)}")
    kwargs: dict[str, Any] = {}
    if file.suffix == ".tsv":
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    if column_names is not None:
        kwargs["column_names"] = list(column_names)
    # A local file is read in about a second: its "Generating split" bar and the
    # builders' own error logs are noise on stderr (a bad file gets one DataError
    # line that carries the parser's message), so both are off for this call.
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with quiet_loggers("datasets"):
            ds = datasets.load_dataset(
                builder,
                data_files={"data": str(file)},
                split="data",
                keep_in_memory=True,
                **kwargs,
            )
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        detail = err.__cause__ if isinstance(err.__cause__, Exception) else err
        raise DataError(f"{file}: cannot read it as {builder}: {detail}") from err
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    return ds


class SplitFile:
    """A split's data file, read as rarely as the format allows: the rows a host serves.

    :meth:`rows` of a Parquet file reads only the row groups that hold them. A
    TSV/CSV/JSON file has no index to seek a row by: the first call parses it whole
    into Arrow columns (:func:`read_table`), kept for later calls, and every call
    cuts them to its rows before any value becomes a Python object.

    Args:
        file: the local file.
        column_names: as :func:`read_table`'s (a headerless TSV/CSV).
    """

    def __init__(self, file: Path, column_names: Sequence[str] | None = None) -> None:
        self.file, self.column_names = file, column_names
        self._parsed: Any = None

    def table(self) -> Any:
        """Every row, as a ``datasets.Dataset`` (parsed once)."""
        if self._parsed is None:
            self._parsed = read_table(self.file, self.column_names)
        return self._parsed

    def rows(self, rows: np.ndarray) -> Any:
        """Rows ``rows`` (sorted, unique positions), in that order, as a ``datasets.Dataset``.

        Raises:
            DataError: the file cannot be parsed or holds fewer rows than ``rows`` needs.
        """
        if self.file.suffix == ".parquet" and self._parsed is None:
            return _parquet_rows(self.file, rows)
        return take_rows(self.table(), rows, str(self.file))


def take_rows(ds: Any, rows: np.ndarray, source: str) -> Any:
    """Rows ``rows`` of the ``datasets.Dataset`` ``ds`` (read from ``source``).

    Raises:
        DataError: ``ds`` is shorter than ``rows`` needs: the file differs from the one
            the driver partitioned (every node must hold the same data).
    """
    _check_length(rows, ds.num_rows, source)
    return ds.select(rows)


def _check_length(rows: np.ndarray, num_rows: int, source: str) -> None:
    if rows.size and int(rows[-1]) >= num_rows:
        raise DataError(
            f"{source}: holds {num_rows} rows, but row {int(rows[-1])} was asked for; every "
            "node must read the same file the driver partitioned"
        )


def _parquet_rows(file: Path, rows: np.ndarray) -> Any:
    """``rows`` of a Parquet file as a ``datasets.Dataset``, reading only their row groups.

    The values are those :func:`read_table` gives: both hold the file's Arrow columns.
    """
    import datasets
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
        sizes = np.array(
            [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], np.int64
        )
        starts = np.concatenate([[0], np.cumsum(sizes)])
        _check_length(rows, int(starts[-1]), str(file))
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist())
    except OSError as err:
        raise DataError(f"{file}: cannot read it as parquet: {err}") from err
    # Where each chosen group starts in the table just read.
    begins = np.concatenate([[0], np.cumsum(sizes[groups])])[:-1]
    local = rows - starts[group_of] + begins[np.searchsorted(groups, group_of)]
    return datasets.Dataset(datasets.table.InMemoryTable(table.take(local)))


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Silence the named libraries' loggers for a block; their errors become ours."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def subsample(idx: np.ndarray, limit: int, seed: int, client: int, purpose: str) -> np.ndarray:
    """At most ``limit`` of ``idx`` (0 = all), drawn from (seed, purpose, client), sorted."""
    if limit <= 0 or idx.size <= limit:
        return idx
    rng = seeds.rng(seed, purpose, client)
    return np.sort(rng.choice(idx, size=limit, replace=False))


class ClientSplits:
    """A split's partition over all ``fed.num_clients`` clients, computed once.

    The partition (``data.partition``, ``data.alpha``, ``data.similarity``,
    ``data.quantity_sigma``) is drawn when this object is built; calling it gives
    each requested client's share split ``1 - data.test_fraction`` /
    ``data.test_fraction``, ``data.val_fraction`` of the training share held out
    for validation, then cut to ``data.max_train_per_client`` /
    ``data.max_val_per_client`` / ``data.max_test_per_client`` rows. A task keeps
    one, so a host that loads its clients' data lazily does not partition the split
    again per client.

    Raises:
        PartitionError: a client would be empty or too small to split; the message
            names the keys (``data.partition``, ``fed.num_clients``), ``source``
            and the client.
    """

    def __init__(
        self,
        cfg: Config,
        num_examples: int,
        labels: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        source: str = "the data",
    ) -> None:
        self.cfg, self.num_examples, self.source = cfg, num_examples, source
        d = cfg.data
        with self._named():
            self.parts = partition(
                num_examples,
                cfg.fed.num_clients,
                d.partition,
                labels=labels,
                seed=cfg.seed,
                alpha=d.alpha,
                similarity=d.similarity,
                quantity_sigma=d.quantity_sigma,
                groups=groups,
            )

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        d, n = self.cfg.data, self.cfg.fed.num_clients
        try:
            yield
        except PartitionError as err:
            raise PartitionError(
                f"data.partition={d.partition} of {self.source} ({self.num_examples} rows) "
                f"over fed.num_clients={n}: {err}"
            ) from err

    def __call__(self, client_ids: Sequence[int]) -> ClientRows:
        """(train, val, test) example indices of each client in ``client_ids``.

        The validation rows are carved from the client's training share before the
        training rows are cut to ``data.max_train_per_client``, so the two never meet
        (``val`` is empty when ``data.val_fraction`` is 0).
        """
        d, seed = self.cfg.data, self.cfg.seed
        out = {}
        with self._named():
            for k in client_ids:
                train, test = split_train_test(self.parts[k], d.test_fraction, seed, k)
                train, val = split_off_validation(train, d.val_fraction, seed, k)
                out[k] = Rows(
                    subsample(train, d.max_train_per_client, seed, k, seeds.SUBSAMPLE_TRAIN),
                    subsample(val, d.max_val_per_client, seed, k, seeds.SUBSAMPLE_VAL),
                    subsample(test, d.max_test_per_client, seed, k, seeds.SUBSAMPLE_TEST),
                )
        return out

    def check(self) -> None:
        """Split every client once: each must hold enough rows for train and test."""
        self(range(self.cfg.fed.num_clients))


def truncation(lengths: dict[str, np.ndarray], max_length: int) -> dict[str, float]:
    """What ``data.max_length`` cuts, per split, from the untruncated token ``lengths``.

    Returns:
        ``truncated.<split>``: the share of the split's examples longer than
        ``max_length`` (no key for an empty split, e.g. ``val`` when
        ``data.val_fraction`` is 0), and ``length_p95``: the length that keeps 95% of
        all examples whole.
    """
    report = {
        f"truncated.{split}": float(np.mean(n > max_length))
        for split, n in lengths.items()
        if n.size
    }
    every = np.concatenate(list(lengths.values()) or [np.zeros(0)])
    report["length_p95"] = float(np.ceil(np.quantile(every, 0.95))) if every.size else 0.0
    return report


def truncation_line(report: dict[str, float], max_length: int, threshold: float = 0.05) -> str:
    """One line for the user when more than ``threshold`` of a split is cut, else ""."""
    cut = {k.split(".", 1)[1]: v for k, v in report.items() if k.startswith("truncated.")}
    if not any(v > threshold for v in cut.values()):
        return ""
    shares = ", ".join(f"{v:.1%} of {split}" for split, v in cut.items())
    keep = int(report["length_p95"])
    return (
        f"data.max_length={max_length} cuts {shares} examples; "
        f"95% fit in {keep} tokens (--set data.max_length={keep})"
    )


@dataclass
class Examples:
    """Tokenized rows of one client split.

    ``rows[i]`` maps model input names (``input_ids``, ``attention_mask``,
    ``token_type_ids``; ``labels`` for causal LM rows) to token-id lists.
    ``targets`` holds class ids or scores (classification/regression), and
    ``extra`` anything a task keeps per row (prompts and references for generation).
    """

    rows: list[dict[str, list[int]]]
    targets: np.ndarray | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": -100}


def pad(rows: Sequence[dict[str, list[int]]], pad_id: int, side: str = "right") -> Batch:
    """Pad each key of ``rows`` to the longest row: (batch, seq) int64 tensors.

    ``input_ids`` pad with ``pad_id``, ``labels`` with -100 (ignored by the loss),
    masks and token types with 0. ``side="left"`` is for batched generation.
    """
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        value = pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        padded = []
        for r in rows:
            fill = [value] * (width - len(r[key]))
            padded.append(fill + r[key] if side == "left" else r[key] + fill)
        out[key] = torch.tensor(padded, dtype=torch.long)
    return out


def param_device(params: dict[str, torch.Tensor]) -> torch.device:
    """Device of the substituted parameters (where batches must go)."""
    return next(iter(params.values())).device if params else torch.device("cpu")
