"""The results directory of one run (DESIGN.md, Results directory).

:class:`ResultsWriter` is a driver callback. After every round it rewrites the
Parquet files atomically (temp file + rename), so a crashed run leaves a
readable folder holding every completed round and no half-written file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pf2lora_ray.client import EvalResult
from pf2lora_ray.config import Config, config_hash, flatten, to_dict
from pf2lora_ray.driver import DriverState, RoundReport
from pf2lora_ray.metrics import HIGHER_IS_BETTER, summarize

METRIC_COLUMNS = ["run_id", "round", "client_id", "split", "metric", "value"]
RANK_COLUMNS = [
    "run_id",
    "round",
    "client_id",
    "layer",
    "energy_rank",
    "threshold_rank",
    "singular_values",
    "true_rank",
]
SYSTEM_COLUMNS = [
    "run_id",
    "round",
    "wall_s",
    "client_compute_s",
    "bytes_up",
    "bytes_down",
    "peak_rss_mb",
    "rss_mb",
    "actors",
    "dropped_clients",
    "faults",
]
RESULT_FILES = ("runs.parquet", "metrics.parquet", "ranks.parquet", "system.parquet")


def run_id_for(cfg: Config) -> str:
    """Deterministic run id: algorithm, seed and the config hash."""
    return f"{cfg.algorithm.name}-s{cfg.seed}-{config_hash(cfg)[:8]}"


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder, so atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def aggregate_rows(rows: list[dict]) -> list[dict]:
    """Across-client mean/std/worst_decile rows (client_id null) per (split, metric)."""
    if not rows:
        return []
    df = pd.DataFrame(rows)
    out = []
    for (split, metric), g in df.groupby(["split", "metric"], sort=True):
        higher = HIGHER_IS_BETTER.get(metric, metric.endswith("accuracy"))
        stats = summarize(g["value"].to_numpy(np.float64), higher_is_better=higher)
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


class ResultsWriter:
    """Driver callback writing config.yaml and the four Parquet files into ``out``.

    Args:
        out: the run folder.
        cfg: the resolved config (written as config.yaml).
        resume_round: when resuming, rows of later rounds (written after the
            checkpoint) are dropped so no round appears twice.
        variant: the run's label in a sweep (default: the algorithm name); the
            ``variant`` column of runs.parquet, which comparison tables group by.
    """

    def __init__(self, out: str | Path, cfg: Config, resume_round: int | None = None,
                 variant: str = "") -> None:
        self.out, self.cfg = Path(out), cfg
        self.variant = variant or cfg.algorithm.name
        self.run_id = run_id_for(cfg)
        self.t0 = time.perf_counter()
        self.tables: dict[str, list[dict]] = {"metrics": [], "ranks": [], "system": []}
        self.prior_wall = 0.0
        if resume_round is not None:
            self._load_existing(resume_round)

    def _load_existing(self, upto: int) -> None:
        for name in self.tables:
            path = self.out / f"{name}.parquet"
            if path.exists():
                df = pd.read_parquet(path)
                df = df[df["round"] <= upto]
                self.tables[name] = df.astype(object).where(df.notna(), None).to_dict("records")
        runs = self.out / "runs.parquet"
        if runs.exists():
            self.prior_wall = float(pd.read_parquet(runs)["wall_s"].iloc[0])

    # -------------------------------------------------------- callback hooks
    def on_start(self, state: DriverState) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False), self.out / "config.yaml")
        self._write_runs("running")
        self._flush()

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        base = {"run_id": self.run_id, "round": report.round}
        train_rows = report.train.rows
        eval_rows = report.eval.rows if report.eval else []
        for row in train_rows + eval_rows + aggregate_rows(train_rows) + aggregate_rows(eval_rows):
            self.tables["metrics"].append({**base, **row})
        for row in report.eval.ranks if report.eval else []:
            self.tables["ranks"].append({**base, **row})
        evaluated = report.eval or EvalResult()
        compute = report.train.compute_s + evaluated.compute_s
        self.tables["system"].append(
            {
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
            }
        )
        self._flush()
        self._write_runs("running")

    def on_end(self, state: DriverState, status: str) -> None:
        self._flush()
        self._write_runs(status)

    # -------------------------------------------------------- files
    def _flush(self) -> None:
        frames = {
            "metrics": (self.tables["metrics"], METRIC_COLUMNS, {"client_id": "Int64"}),
            "ranks": (self.tables["ranks"], RANK_COLUMNS, {"true_rank": "Int64"}),
            "system": (self.tables["system"], SYSTEM_COLUMNS, {}),
        }
        for name, (rows, columns, dtypes) in frames.items():
            df = pd.DataFrame(rows, columns=columns if not rows else None)
            for col, dtype in dtypes.items():
                df[col] = df[col].astype(dtype)
            write_parquet(df, self.out / f"{name}.parquet")

    def _write_runs(self, status: str) -> None:
        row = {
            "run_id": self.run_id,
            "algorithm": self.cfg.algorithm.name,
            "variant": self.variant,
            "seed": self.cfg.seed,
            "status": status,
            "wall_s": self.prior_wall + time.perf_counter() - self.t0,
            "config_hash": config_hash(self.cfg),
        }
        flat = {
            k: (str(v) if isinstance(v, list) else v) for k, v in flatten(to_dict(self.cfg)).items()
        }
        write_parquet(pd.DataFrame([{**row, **flat}]), self.out / "runs.parquet")
