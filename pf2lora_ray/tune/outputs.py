"""What a tune leaves besides Ray's own folder: trials.parquet and best.yaml."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune

from pf2lora_ray.config import Config, flatten, from_dict, read_yaml, set_dotted, to_dict
from pf2lora_ray.results import write_parquet, write_text
from pf2lora_ray.storage import Location, location
from pf2lora_ray.tune.space import SPLITS, Space
from pf2lora_ray.tune.trial import PLANNED

TRIALS_FILE = "trials.parquet"
BEST_FILE = "best.yaml"
CONFIG_PREFIX = "config/"


class TrialsWriter(tune.Callback):
    """Tune callback: rewrite ``trials.parquet`` atomically after every reported result.

    Rows are keyed by (trial_id, round), so a trial restarted on resume
    overwrites the rounds it reports again. Earlier rows are read back in
    :meth:`setup` (not ``__init__``: Tune restores this object from its pickle,
    which is why it keeps the file's name, not a file system object).
    """

    def __init__(self, path: str | Path | Location, keys: Sequence[str]) -> None:
        self.path, self.keys = location(path).portable, list(keys)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}

    def setup(self, **info: Any) -> None:
        self.rows = {}
        file = location(self.path)
        if file.is_file():
            for row in file.read_parquet().to_dict("records"):
                self.rows[(row["trial_id"], int(row["round"]))] = row

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        self.add(trial.trial_id, result, trial.config)
        self.write()

    def add(self, trial_id: str, result: dict[str, Any], config: dict[str, Any]) -> None:
        """Keep one reported result (its round replaces an earlier report of that round)."""
        row: dict[str, Any] = {"trial_id": trial_id, "round": int(result["round"])}
        if PLANNED in result:
            row[PLANNED] = int(result[PLANNED])
        row |= {k: v for k, v in result.items() if k.split(".")[0] in SPLITS}
        row |= {f"{CONFIG_PREFIX}{k}": config[k] for k in self.keys}
        self.rows[(row["trial_id"], row["round"])] = row

    def write(self) -> None:
        """Rewrite the trials file atomically from every row kept."""
        frame = pd.DataFrame([self.rows[k] for k in sorted(self.rows)])
        write_parquet(frame, location(self.path))


def complete_from_runs(out: str | Path | Location, keys: Sequence[str]) -> None:
    """Add to ``trials.parquet`` every evaluation a trial's run wrote that Tune did not see.

    A trial's run folder (``trials/<trial_id>/metrics.parquet``) holds the aggregates of
    every evaluation round, the final one included; what reaches Tune's callbacks can
    miss the last report of a trial that ends right after it. The run folder is the
    record, so best.yaml and the report judge every trial at its real last evaluation.
    """
    out = location(out)
    writer = TrialsWriter(out / TRIALS_FILE, keys)
    writer.setup()
    added = False
    for run_dir in (out / "trials").iterdir():
        metrics_path, config_path = run_dir / "metrics.parquet", run_dir / "config.yaml"
        if not (metrics_path.exists() and config_path.is_file()):
            continue
        rows = metrics_path.read_parquet()
        rows = rows[rows["client_id"].isna()]
        evaluated = rows.loc[rows["split"] != "train", "round"].unique()
        rows = rows[rows["round"].isin(evaluated)]  # Tune hears of evaluation rounds only
        with config_path.local_file() as config_file:
            flat = flatten(read_yaml(config_file))
        for round_, group in rows.groupby("round"):
            if (run_dir.name, int(round_)) in writer.rows:
                continue
            result = {f"{r.split}.{r.metric}": float(r.value) for r in group.itertuples()}
            result |= {"round": int(round_), PLANNED: int(flat["fed.rounds"])}
            writer.add(run_dir.name, result, {k: flat[k] for k in keys})
            added = True
    if added:
        writer.write()


def overrides_of(cfg: Config) -> dict[str, Any]:
    """The nested overrides of the defaults that rebuild ``cfg`` (what a job YAML holds)."""
    defaults = flatten(to_dict(Config()))
    out: dict[str, Any] = {}
    for key, value in flatten(to_dict(cfg)).items():
        if value != defaults.get(key):
            set_dotted(out, key, value)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (as read back from Parquet) to plain Python for YAML."""
    return value.tolist() if hasattr(value, "tolist") else value


def write_best(
    trials: pd.DataFrame, base: Config, space: Space, out: str | Path | Location
) -> Location:
    """Write ``best.yaml``: base overrides + fixed + the best trial's values; returns its path.

    The best trial is the one whose last reported ``space.metric`` is best (the
    same rule as ``pf2lora report``). The file is checked to build a valid config.
    """
    from analysis.tables import best_trial

    out = location(out)
    best = best_trial(trials, space.metric, space.mode)
    job = overrides_of(base)
    for key, value in space.fixed.items():
        set_dotted(job, key, value)
    for key in space.params:
        set_dotted(job, key, _plain(best[f"{CONFIG_PREFIX}{key}"]))
    from_dict(copy.deepcopy(job))
    # Job files are read from local disk: a best.yaml in a bucket is copied down first.
    path = out / BEST_FILE
    run = (
        f"pf2lora run {path}" if path.is_local else f"pf2lora run {BEST_FILE} (copied from {path})"
    )
    header = (
        f"# Best of {trials['trial_id'].nunique()} trials by {space.metric} ({space.mode}): "
        f"{float(best[space.metric]):.6g}, trial {best['trial_id']}.\n"
        f"# Run it with: {run}\n"
    )
    write_text(header + yaml.safe_dump(job, sort_keys=False), path)
    return path
