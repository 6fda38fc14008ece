"""Read a results directory (one run, a comparison of runs, or a Tune sweep) into DataFrames.

A run folder holds ``runs.parquet``, ``metrics.parquet``, ``ranks.parquet`` and
``system.parquet`` (see docs/DESIGN.md, "Results directory"). A comparison folder
holds several runs, either in the same files or one run folder per subfolder
(searched up to MAX_DEPTH levels down, e.g. OUT/<task>/<method>-s<seed>/).
A Tune folder holds ``trials.parquet``. Any of them may be a local path or a URI
(``s3://bucket/sst2``), read through :mod:`pf2lora_ray.storage` (``pyarrow.fs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pf2lora_ray.storage import Location, location

RUNS_SCHEMA = {
    "run_id": "str",
    "algorithm": "str",
    "seed": "int64",
    "status": "str",
    "wall_s": "float64",
}
METRICS_SCHEMA = {
    "run_id": "str",
    "round": "int64",
    "client_id": "Int64",
    "split": "str",
    "metric": "str",
    "value": "float64",
}
RANKS_SCHEMA = {
    "run_id": "str",
    "round": "int64",
    "client_id": "int64",
    "layer": "str",
    "energy_rank": "int64",
    "threshold_rank": "int64",
    "singular_values": "object",
    "true_rank": "Int64",
}
SYSTEM_SCHEMA = {
    "run_id": "str",
    "round": "int64",
    "wall_s": "float64",
    "client_compute_s": "float64",
    "bytes_up": "int64",
    "bytes_down": "int64",
    "peak_rss_mb": "float64",
    "actors": "int64",
}
SCHEMAS = {
    "runs": RUNS_SCHEMA,
    "metrics": METRICS_SCHEMA,
    "ranks": RANKS_SCHEMA,
    "system": SYSTEM_SCHEMA,
}
TRIALS_FILE = "trials.parquet"

# Columns that hold nulls by contract; Parquet writers without pandas metadata
# turn an integer column with nulls into float64, so these are coerced back.
_NULLABLE_INT_COLUMNS = {"metrics": ["client_id"], "ranks": ["true_rank"]}
# A column absent from a file is added as all-null, so it needs a dtype that holds nulls.
_NULLABLE = {"int64": "Int64"}


@dataclass(frozen=True)
class Results:
    """The four tables of one or more runs.

    Attributes:
        runs: One row per run (run_id, algorithm, seed, status, wall_s, config columns).
        metrics: Long format (run_id, round, client_id, split, metric, value);
            client_id is null on aggregate rows.
        ranks: Per (run_id, round, client_id, layer) learned ranks.
        system: Per (run_id, round) cost measurements.
    """

    runs: pd.DataFrame
    metrics: pd.DataFrame
    ranks: pd.DataFrame
    system: pd.DataFrame


def empty_table(name: str) -> pd.DataFrame:
    """Return an empty table with the columns and dtypes of ``name``.

    Args:
        name: One of "runs", "metrics", "ranks", "system".
    """
    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in SCHEMAS[name].items()})


# How deep run folders are searched for: a study keeps OUT/<task>/<method>-s<seed>/.
MAX_DEPTH = 3


def has_run_files(folder: str | Path | Location) -> bool:
    """Whether ``folder`` directly holds at least one of the run Parquet results.

    A result is a Parquet file or a Parquet dataset folder of part files;
    ``pd.read_parquet`` reads both.
    """
    folder = location(folder)
    return any((folder / f"{name}.parquet").exists() for name in SCHEMAS)


def run_folders(path: str | Path | Location) -> list[Location]:
    """Return the folders whose run files make up the results under ``path``.

    That is ``[path]`` when ``path`` holds run files itself, otherwise every
    folder below it (at most MAX_DEPTH levels, sorted by path) that holds run
    files; the search does not descend into a run folder, a hidden folder, or
    a Tune folder (one holding trials.parquet, reported on its own).

    Raises:
        FileNotFoundError: If ``path`` is not a folder or no run files are found.
    """
    path = location(path)
    if not path.is_dir():
        raise FileNotFoundError(f"results path {path} is not a folder")
    if has_run_files(path):
        return [path]
    folders = sorted(_find_run_folders(path, MAX_DEPTH), key=lambda folder: folder.path)
    if not folders:
        expected = ", ".join(f"{name}.parquet" for name in SCHEMAS)
        raise FileNotFoundError(f"no run files ({expected}) in {path} or its subfolders")
    return folders


def _find_run_folders(folder: Location, depth: int) -> list[Location]:
    if depth == 0 or (folder / TRIALS_FILE).exists():
        return []
    found = []
    for sub in folder.iterdir():
        if sub.name.startswith(".") or sub.name.endswith(".parquet") or not sub.is_dir():
            continue
        found += [sub] if has_run_files(sub) else _find_run_folders(sub, depth - 1)
    return found


def load_results(path: str | Path | Location) -> Results:
    """Load a run folder or a comparison folder.

    Files at the top of ``path`` are read when present; otherwise the files of
    every run folder below it (``run_folders``) are concatenated. A missing file gives
    an empty table with the documented columns.

    Args:
        path: A run folder, or a folder of run folders.

    Returns:
        The four tables, with ``client_id`` and ``true_rank`` as nullable Int64.

    Raises:
        FileNotFoundError: If no run files are found (see ``run_folders``).
    """
    folders = run_folders(path)
    tables = {name: _read_table(folders, name) for name in SCHEMAS}
    return Results(**tables)


def load_tune(path: str | Path | Location) -> pd.DataFrame:
    """Load ``trials.parquet`` from a Tune folder.

    Args:
        path: The Tune folder, or the ``trials.parquet`` file itself.

    Returns:
        One row per (trial_id, round), sorted by trial_id then round.

    Raises:
        FileNotFoundError: If there is no trials file.
    """
    path = location(path)
    file = path / TRIALS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {TRIALS_FILE} at {path}")
    trials = file.read_parquet()
    return trials.sort_values(["trial_id", "round"], ignore_index=True)


def _read_table(folders: list[Location], name: str) -> pd.DataFrame:
    files = [folder / f"{name}.parquet" for folder in folders]
    frames = [file.read_parquet() for file in files if file.exists()]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return empty_table(name)
    table = pd.concat(frames, ignore_index=True)
    return _conform(table, name)


def _conform(table: pd.DataFrame, name: str) -> pd.DataFrame:
    for column, dtype in SCHEMAS[name].items():
        if column not in table:
            table[column] = pd.Series(pd.NA, index=table.index, dtype=_NULLABLE.get(dtype, dtype))
    nullable = _NULLABLE_INT_COLUMNS.get(name, [])
    return table.astype(dict.fromkeys(nullable, "Int64"))
