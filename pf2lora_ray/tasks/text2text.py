"""Any data-to-text table as a generation task (``data.name: text2text``), no code needed.

``data.path`` is a file, or a folder holding ``<data.split>.<ext>``, in any format
:func:`~pf2lora_ray.tasks.text.read_table` reads (TSV, CSV, JSON / JSON Lines,
Parquet). ``data.source_column`` names the column a causal LM reads (inside
``data.prompt``, default ``{source}\\nText:``) and ``data.target_column`` the
text it should write.

- Rows with the same source (and group) form one entry: its targets are its
  references, all of them training examples when the entry is on a client's
  train side, all scored against one decoded text when it is on the test side
  (multi-reference BLEU, chrF, TER and ROUGE-L, as in WebNLG).
- ``data.group_column`` names a column that groups rows (a domain, a category,
  an author): ``data.partition: task`` then gives each client one group,
  ``dirichlet`` / ``label_sort`` skew clients by group. Without it, ``iid`` and
  ``quantity`` are the partitions that apply.

Example: a CSV with columns ``table, text, domain``::

    data:
      name: text2text
      path: data/my_d2t.csv
      source_column: table
      target_column: text
      group_column: domain
      partition: task
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks.base import DataError, register_task
from pf2lora_ray.tasks.generation import Entry, GenerationTask
from pf2lora_ray.tasks.text import SplitFile, find_split_file

GROUPED = ("task", "dirichlet", "label_sort")  # partitions that need a group per entry


def _text(value: Any, file: Any, row: int, column: str) -> str:
    """A cell as stripped text; a missing or empty cell is a DataError naming its row."""
    text = "" if value is None else str(value).strip()
    if not text:
        raise DataError(f"{file}: row {row} has no value in column {column!r}")
    return text


@register_task("text2text")
class Text2TextTask(GenerationTask):
    """Source column -> target column with a causal LM; rows grouped into entries by source."""

    name = "text2text"

    def __init__(self, cfg: Config) -> None:
        d = cfg.data
        if d.path is None:
            raise ConfigError(
                "data.path: text2text reads a local TSV/CSV/JSON/Parquet file, or a folder "
                f"holding {d.split}.<tsv|csv|json|jsonl|parquet>"
            )
        for key in ("source_column", "target_column"):
            if not getattr(d, key):
                raise ConfigError(f"data.{key}: text2text needs the name of the file's column")
        if d.partition in GROUPED and not d.group_column:
            raise ConfigError(
                f"data.group_column: data.partition={d.partition} splits clients by group; "
                "name the column that holds each row's group, or use iid / quantity"
            )
        super().__init__(cfg, find_split_file(d.path, d.split))
        self._file: SplitFile | None = None

    def read_entries(self, rows: np.ndarray | None = None) -> list[Entry]:
        """Rows grouped by (group, source) in order of first appearance.

        With ``rows``, only those are read (:class:`~pf2lora_ray.tasks.text.SplitFile`:
        a Parquet file reads their row groups; a TSV/CSV/JSON file is parsed whole
        once per task instance and cut to them before grouping).

        Raises:
            DataError: a named column is missing, a cell is empty, or the file has no rows.
        """
        d = self.cfg.data
        if self._file is None:
            self._file = SplitFile(self.file)
        table = self._file.table() if rows is None else self._file.rows(rows)
        columns = [d.source_column, d.target_column] + ([d.group_column] if d.group_column else [])
        absent = [c for c in columns if c not in table.column_names]
        if absent:
            raise DataError(
                f"{self.file}: no column {absent[0]!r} (data.source_column / target_column / "
                f"group_column); its columns are {table.column_names}"
            )
        if len(table) == 0:
            raise DataError(f"{self.file}: holds no rows")
        groups = table[d.group_column] if d.group_column else [""] * len(table)
        texts: dict[tuple[str, str], list[str]] = {}
        at: dict[tuple[str, str], list[int]] = {}  # the file rows of each entry
        positions = range(len(table)) if rows is None else rows.tolist()
        for i, source, target, group in zip(
            positions, table[d.source_column], table[d.target_column], groups, strict=True
        ):
            row = i + 1  # numbered from 1 as a person counts them (after a CSV/TSV header)
            key = (
                _text(group, self.file, row, d.group_column) if d.group_column else "",
                _text(source, self.file, row, d.source_column),
            )
            texts.setdefault(key, []).append(_text(target, self.file, row, d.target_column))
            at.setdefault(key, []).append(i)
        return [
            Entry(source, tuple(refs), group, tuple(at[group, source]))
            for (group, source), refs in texts.items()
        ]
