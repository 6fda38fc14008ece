"""The results directory of one run (DESIGN.md, Results directory).

:class:`ResultsWriter` is a driver callback. ``metrics.parquet``,
``ranks.parquet`` and ``system.parquet`` are Parquet *dataset folders*: after
every round it appends one part file per table (``metrics.parquet/part-000012.parquet``
holds round 12's rows), so a round costs the same whatever came before and the
driver keeps no rows in memory. An evaluation that visits the clients in several
chunks (``runtime.eval_chunk``) writes each chunk's metric and rank rows as soon
as it is scored (``part-000012-00003.parquet``: round 12, chunk 3), so a crash in
the middle of an evaluation loses nothing already scored; the round's own part
then holds its training rows and the across-client aggregates.
``part-000000.parquet`` is an empty part that fixes the table's schema.
``pd.read_parquet(run / "metrics.parquet")`` (and :mod:`analysis.load`) reads a
folder as one table, in round order.

The folder may be a local path or a URI (``s3://bucket/run``); every file goes
through :mod:`pf2lora_ray.storage`. Every file is written atomically (locally a
hidden temp file, which Parquet readers skip, renamed into place; on an object
store one PUT of the complete object under its final name), so a crashed run
leaves a readable folder holding every completed round and no half-written
file. ``runs.parquet`` (one row) is a plain file, rewritten after every round.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pf2lora_ray.client import EvalResult
from pf2lora_ray.config import Config, config_hash, flatten, to_dict
from pf2lora_ray.driver import DriverState, RoundReport
from pf2lora_ray.metrics import higher_is_better, summarize
from pf2lora_ray.storage import Location, location

# Column -> Arrow type of each per-round table; every part file of a table has this schema.
METRIC_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("round", pa.int64()),
        ("client_id", pa.int64()),  # null on across-client aggregate rows
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)
RANK_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("round", pa.int64()),
        ("client_id", pa.int64()),
        ("layer", pa.string()),
        ("energy_rank", pa.int64()),
        ("threshold_rank", pa.int64()),
        ("singular_values", pa.list_(pa.float64())),
        ("true_rank", pa.int64()),  # null for real data
    ]
)
SYSTEM_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("round", pa.int64()),
        ("wall_s", pa.float64()),
        ("client_compute_s", pa.float64()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("peak_rss_mb", pa.float64()),
        ("rss_mb", pa.float64()),
        ("actors", pa.int64()),
        ("clients", pa.int64()),
        ("dropped_clients", pa.list_(pa.int64())),
        ("faults", pa.list_(pa.string())),
        # Placement (Ray backend; null in-process): per actor, the clients it trained
        # and their seconds; personal state moved between actors in the round.
        ("actor_clients", pa.list_(pa.int64())),
        ("actor_compute_s", pa.list_(pa.float64())),
        ("moved_clients", pa.int64()),
        ("moved_bytes", pa.int64()),
        # Personal state spilled to / read back from the hosts' disks (runtime.state_memory_mb).
        ("state_spilled_bytes", pa.int64()),
        ("state_read_bytes", pa.int64()),
    ]
)
SCHEMAS = {"metrics": METRIC_SCHEMA, "ranks": RANK_SCHEMA, "system": SYSTEM_SCHEMA}
METRIC_COLUMNS = METRIC_SCHEMA.names
RANK_COLUMNS = RANK_SCHEMA.names
SYSTEM_COLUMNS = SYSTEM_SCHEMA.names
_NULLABLE_INT = {"client_id", "true_rank", "moved_clients", "moved_bytes"}
RESULT_FILES = ("runs.parquet", "metrics.parquet", "ranks.parquet", "system.parquet")


def run_id_for(cfg: Config) -> str:
    """Deterministic run id: algorithm, seed and the config hash."""
    return f"{cfg.algorithm.name}-s{cfg.seed}-{config_hash(cfg)[:8]}"


def atomic_write(path: str | Path | Location, write: Any) -> None:
    """Call ``write(tmp_path)`` on a local temp file, then make it ``path`` atomically."""
    location(path).write_with(write)


def parquet_bytes(table: pa.Table | pd.DataFrame) -> bytes:
    """A table (or a DataFrame, without its index) as the bytes of one Parquet file."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_parquet(df: pd.DataFrame, path: str | Path | Location) -> None:
    location(path).write_bytes(parquet_bytes(df))


def write_part(rows: list[dict], schema: pa.Schema, path: str | Path | Location) -> None:
    """Write ``rows`` as one part file of a table with ``schema`` (atomically).

    Raises:
        ValueError: a row has a column the schema does not know (it would be
            silently dropped by readers of the dataset folder).
    """
    path = location(path)
    unknown = sorted({k for row in rows for k in row} - set(schema.names))
    if unknown:
        raise ValueError(
            f"{path.parent.name}: columns {unknown} are not in its schema {schema.names}; "
            "add them to pf2lora_ray/results.py"
        )
    df = pd.DataFrame(rows, columns=schema.names)
    df = df.astype({c: "Int64" for c in schema.names if c in _NULLABLE_INT})
    path.write_bytes(parquet_bytes(pa.Table.from_pandas(df, schema=schema, preserve_index=False)))


def part_name(round_: int) -> str:
    return f"part-{round_:06d}.parquet"


def chunk_part_name(round_: int, chunk: int) -> str:
    """Chunk ``chunk`` of round ``round_``'s evaluation; sorts before the round's own part."""
    return f"part-{round_:06d}-{chunk:05d}.parquet"


def part_round(path: Path | Location) -> int | None:
    """The round a part file (or an evaluation chunk's) holds (None for anything else)."""
    stem = path.name.removeprefix("part-").removesuffix(".parquet").split("-")[0]
    return int(stem) if path.name.startswith("part-") and stem.isdigit() else None


def write_text(text: str, path: str | Path | Location) -> None:
    location(path).write_text(text)


def aggregate_rows(rows: list[dict]) -> list[dict]:
    """Across-client mean/std/worst_decile rows (client_id null) per (split, metric)."""
    if not rows:
        return []
    df = pd.DataFrame(rows)
    out = []
    for (split, metric), g in df.groupby(["split", "metric"], sort=True):
        stats = summarize(g["value"].to_numpy(np.float64), higher_is_better(metric))
        for stat in ("mean", "std", "worst_decile"):
            out.append(
                {
                    "client_id": None,
                    "split": split,
                    "metric": f"{metric}.{stat}",
                    "value": float(stats[stat]),
                }
            )
    return out


def _to_folder(path: Path, schema: pa.Schema) -> None:
    """Turn a single-file table (older versions wrote those) into a part folder, in place.

    Only local folders hold such files (they predate URIs). The folder is built
    under a hidden name and swapped in, so a crash leaves either the file or the
    folder (the file under a hidden ``.old`` name at worst).
    """
    rows = pd.read_parquet(path)
    rows = rows.astype(object).where(rows.notna(), None).to_dict("records")
    tmp, old = path.with_name(f".{path.name}.new"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write_part([], schema, tmp / part_name(0))
    by_round: dict[int, list[dict]] = {}
    for row in rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    for round_, part in sorted(by_round.items()):
        write_part(part, schema, tmp / part_name(round_))
    os.replace(path, old)
    os.replace(tmp, path)
    old.unlink()


class ResultsWriter:
    """Driver callback writing config.yaml, runs.parquet and the per-round tables into ``out``.

    Args:
        out: the run folder: a local path or a URI (:func:`pf2lora_ray.storage.location`).
        cfg: the resolved config (written as config.yaml).
        resume_round: when resuming, the part files of later rounds (written
            after the checkpoint) are deleted so no round appears twice.
        variant: the run's label in a sweep (default: the algorithm name); the
            ``variant`` column of runs.parquet, which comparison tables group by.
    """

    def __init__(
        self,
        out: str | Path | Location,
        cfg: Config,
        resume_round: int | None = None,
        variant: str = "",
        data_check: dict[str, float] | None = None,
    ) -> None:
        self.out, self.cfg = location(out), cfg
        self.variant = variant or cfg.algorithm.name
        self.data_check = {f"data_check.{k}": float(v) for k, v in (data_check or {}).items()}
        self.run_id = run_id_for(cfg)
        self.t0 = time.perf_counter()
        self.prior_wall = 0.0
        self.chunks = 0  # evaluation chunks written in the current round
        if resume_round is not None:
            self._drop_after(resume_round)

    def _drop_after(self, upto: int) -> None:
        for name, schema in SCHEMAS.items():
            folder = self.out / f"{name}.parquet"
            if folder.is_local and folder.local.is_file():
                _to_folder(folder.local, schema)
            for part in folder.glob("part-", ".parquet"):
                if (part_round(part) or 0) > upto:
                    part.delete()
        runs = self.out / "runs.parquet"
        if runs.exists():
            self.prior_wall = float(runs.read_parquet()["wall_s"].iloc[0])

    # -------------------------------------------------------- callback hooks
    def on_start(self, state: DriverState) -> None:
        self.out.mkdir()
        write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False), self.out / "config.yaml")
        for name, schema in SCHEMAS.items():
            schema_part = self.out / f"{name}.parquet" / part_name(0)
            if not schema_part.exists():
                write_part([], schema, schema_part)
        self._write_runs("running")

    def on_eval_chunk(self, state: DriverState, round_: int, chunk: EvalResult) -> None:
        """Write a chunk of the round's evaluation now (its metric and rank rows)."""
        base = {"run_id": self.run_id, "round": round_}
        self.chunks += 1
        part = chunk_part_name(round_, self.chunks)
        self._append("metrics", [{**base, **row} for row in chunk.rows], part)
        if chunk.ranks:
            self._append("ranks", [{**base, **row} for row in chunk.ranks], part)

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        base = {"run_id": self.run_id, "round": report.round}
        self.chunks = 0
        evaluated = report.eval or EvalResult()
        train_rows, eval_rows = report.train.rows, evaluated.rows
        metrics = train_rows + ([] if evaluated.streamed else eval_rows)
        metrics += aggregate_rows(train_rows) + aggregate_rows(eval_rows)
        ranks = evaluated.ranks
        compute = report.train.compute_s + evaluated.compute_s
        system = {
            **base,
            "wall_s": report.wall_s,
            "client_compute_s": compute,
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            "peak_rss_mb": state.backend.peak_rss_mb(),
            "rss_mb": state.backend.rss_mb(),
            "actors": state.backend.num_actors,
            "clients": len(report.clients),
            # Clients whose work this round was lost after faults.max_retries retries,
            # and every actor failure met (recovered or not), in words.
            "dropped_clients": sorted({*report.train.dropped, *evaluated.dropped}),
            "faults": report.train.faults + evaluated.faults,
            "state_spilled_bytes": report.train.spilled_bytes + evaluated.spilled_bytes,
            "state_read_bytes": report.train.read_bytes + evaluated.read_bytes,
        }
        stats = state.backend.round_stats()
        system |= {k: stats.get(k) for k in SYSTEM_COLUMNS if k.startswith(("actor_", "moved_"))}
        part = part_name(report.round)
        self._append("metrics", [{**base, **row} for row in metrics], part)
        if ranks:
            self._append("ranks", [{**base, **row} for row in ranks], part)
        self._append("system", [system], part)
        self._write_runs("running")

    def on_end(self, state: DriverState, status: str) -> None:
        self._write_runs(status)

    # -------------------------------------------------------- files
    def _append(self, name: str, rows: list[dict], part: str) -> None:
        write_part(rows, SCHEMAS[name], self.out / f"{name}.parquet" / part)

    def _write_runs(self, status: str) -> None:
        row = {
            "run_id": self.run_id,
            "algorithm": self.cfg.algorithm.name,
            "variant": self.variant,
            "seed": self.cfg.seed,
            "status": status,
            "wall_s": self.prior_wall + time.perf_counter() - self.t0,
            "config_hash": config_hash(self.cfg),
            **self.data_check,
        }
        flat = {
            k: (str(v) if isinstance(v, list) else v) for k, v in flatten(to_dict(self.cfg)).items()
        }
        write_parquet(pd.DataFrame([{**row, **flat}]), self.out / "runs.parquet")
