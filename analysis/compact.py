"""A study's results in a few hundred KB, kept in git, from which its report is made again.

``pf2lora report OUT --compact DEST`` writes DEST from a study folder OUT (a tree of
run folders and Tune folders). DEST holds:

- ``runs.parquet``: every run's row (config, status, wall time, data check);
- ``metrics.parquet``: every evaluation row (``val`` and ``test`` splits, per client
  and aggregate, diagnostics included: ``<metric>.shared_only``, ``norm_C``, ``norm_D``),
  at every evaluation round; training rows are left out;
- ``ranks.parquet``: each run's ranks at its last round (singular values as float32:
  a layer's spectrum in float64 is most of a compact folder for a 30-layer model);
- ``search.parquet``: one row per Tune trial of every search under OUT (the method's
  folder, the trial, the round it reached of the rounds it planned, its last reported
  values), so the report can say how each method was searched.

``pf2lora report DEST`` then writes the same tables as ``pf2lora report OUT``: a
document that quotes them can be checked against DEST alone (tests/test_reproduction.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import TRIALS_FILE, Results, load_results, load_tune
from analysis.tables import at_round, trials_last_round
from pf2lora_ray.storage import Location, location

SEARCH_FILE = "search.parquet"
PLANNED = "rounds_planned"


def compact_results(results: Results) -> Results:
    """Evaluation rows at every evaluation round, ranks at the last round, no system rows."""
    metrics = results.metrics[results.metrics["split"] != "train"].reset_index(drop=True)
    ranks = results.ranks
    if not ranks.empty:
        ranks = at_round(ranks, None, by="run_id").reset_index(drop=True)
        if "singular_values" in ranks:
            ranks["singular_values"] = [
                None if v is None else np.asarray(v, dtype=np.float32)
                for v in ranks["singular_values"]
            ]
    return Results(results.runs, metrics, ranks, results.system.iloc[0:0])


def tune_folders(root: str | Path | Location) -> list[Location]:
    """Every folder under ``root`` (itself included) that holds a Tune ``trials.parquet``."""
    return [file.parent for file in location(root).rglob(TRIALS_FILE)]


def search_rows(root: str | Path | Location) -> pd.DataFrame:
    """One row per trial of every search under ``root``, at the last round it reported.

    Columns: ``search`` (the Tune folder relative to ``root``, e.g. ``tune/sst2/homlora``),
    ``trial_id``, ``round``, ``rounds_planned`` (NaN for tunes that predate it), then the
    reported metrics and ``config/`` values.
    """
    root = location(root)
    frames = []
    for folder in tune_folders(root):
        last = trials_last_round(load_tune(folder))
        frames.append(last.assign(search=root.relative(folder.path)))
    if not frames:
        return pd.DataFrame(columns=["search", "trial_id", "round", PLANNED])
    rows = pd.concat(frames, ignore_index=True)
    if PLANNED not in rows:
        rows[PLANNED] = pd.NA
    first = ["search", "trial_id", "round", PLANNED]
    return rows[first + [c for c in rows.columns if c not in first]]


def search_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per search: how many trials, how many ran to the end, and where the others stopped."""
    records = []
    for search, group in rows.groupby("search", sort=True):
        planned = group[PLANNED]
        complete = (group["round"] >= planned) if planned.notna().all() else None
        stopped = group.loc[~complete, "round"] if complete is not None else pd.Series()
        records.append(
            {
                "search": search,
                "trials": len(group),
                "rounds planned": int(planned.max()) if planned.notna().any() else pd.NA,
                "ran to the end": int(complete.sum()) if complete is not None else pd.NA,
                "stopped at rounds": ", ".join(str(int(r)) for r in sorted(stopped)) or "-",
            }
        )
    return pd.DataFrame(records)


def write_compact(source: str | Path | Location, dest: str | Path | Location) -> list[Location]:
    """Write the compact form of the study under ``source`` into ``dest`` (see module doc).

    Either may be a local folder or a URI (``s3://``, ``gs://``, ``file://``); each
    file is written whole under its final name (``Location.write_with``).

    Returns:
        The files written.

    Raises:
        FileNotFoundError: ``source`` holds no run files.
    """
    source, dest = location(source), location(dest)
    compact = compact_results(load_results(source))
    dest.mkdir()
    written = []
    for name in ("runs", "metrics", "ranks"):
        written.append(_write(getattr(compact, name), dest / f"{name}.parquet"))
    search = search_rows(source)
    if not search.empty:
        written.append(_write(search, dest / SEARCH_FILE))
    return written


def _write(frame: pd.DataFrame, file: Location) -> Location:
    file.write_with(lambda tmp: frame.to_parquet(tmp, index=False))
    return file
