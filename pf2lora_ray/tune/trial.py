"""One Tune trial: its config, what it reports to Tune, and the resources it reserves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import tune

from pf2lora_ray.checkpoint import has_checkpoint
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.driver import DriverState, RoundReport, is_eval_round
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.results import aggregate_rows
from pf2lora_ray.storage import Location, location
from pf2lora_ray.tune.space import Space, trial_config

# The driver only aggregates under the Ray backend; half a CPU leaves room for actors.
RAY_DRIVER_CPUS = 0.5
_EPS = 1e-9
# Reported with every result: the trial's fed.rounds, so a report can tell a trial that
# ran to the end from one a scheduler stopped.
PLANNED = "rounds_planned"


def round_metrics(report: RoundReport) -> dict[str, float]:
    """``{"<split>.<metric>.<stat>": value}``: the round's across-client aggregates."""
    rows = report.train.rows + (report.eval.rows if report.eval else [])
    return {f"{r['split']}.{r['metric']}": r["value"] for r in aggregate_rows(rows)}


class TuneReporter:
    """Driver callback: ``tune.report`` the aggregates and ``round`` of every eval round.

    Args:
        metric: the space's metric; a job that does not report it fails the trial.
        run_dir: the run folder; when the run resumes from a checkpoint, the
            checkpoint round's aggregates are read back from its metrics.parquet and
            reported first (the trial may have been stopped before reporting them).
    """

    def __init__(self, metric: str, run_dir: str | Path | Location | None = None) -> None:
        self.metric = metric
        self.run_dir = None if run_dir is None else location(run_dir)

    def on_start(self, state: DriverState) -> None:
        if state.round == 0 or self.run_dir is None or not is_eval_round(state.cfg, state.round):
            return
        rows = (self.run_dir / "metrics.parquet").read_parquet()
        rows = rows[rows["client_id"].isna() & (rows["round"] == state.round)]
        metrics = {f"{r.split}.{r.metric}": float(r.value) for r in rows.itertuples()}
        if self.metric in metrics:
            tune.report({**metrics, "round": state.round, PLANNED: state.cfg.fed.rounds})

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        if report.eval is None:
            return
        metrics = round_metrics(report)
        if self.metric not in metrics:
            raise ConfigError(
                f"metric: {self.metric!r} is not reported by this job; it reports {sorted(metrics)}"
            )
        tune.report({**metrics, "round": report.round, PLANNED: state.cfg.fed.rounds})

    def on_end(self, state: DriverState, status: str) -> None:
        pass


def run_trial(values: dict[str, Any], base: Config, space: Space, out: str) -> None:
    """One Tune trial: the base config with ``values``, run into ``out/trials/<trial_id>``.

    ``out`` is the tune folder as an absolute path or a URI: the trial may run on
    another node, which opens it with its own credentials (:mod:`pf2lora_ray.storage`).
    A trial restarted by ``--resume`` continues from its run's latest checkpoint;
    without one its partial folder is cleared and it starts over.
    """
    cfg = trial_config(base, {**space.fixed, **values})
    run_dir = location(out) / "trials" / tune.get_context().get_trial_id()
    resume = has_checkpoint(run_dir)
    if not resume:
        run_dir.delete()
    reporter = TuneReporter(space.metric, run_dir)
    run_experiment(cfg, run_dir, resume=resume, extra_callbacks=[reporter])


# ---------------------------------------------------------------- resources


def trial_bundles(cfg: Config, driver_cpus: float | None = None) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the driver, then one per client actor.

    Under ``runtime.backend=local`` the driver hosts every client, so its single
    bundle gets one actor's resources. Under ``ray`` the driver only aggregates
    (``driver_cpus``, default 0.5 CPU) and the trial reserves ``resources.num_actors``
    actors (or ``ceil(num_clients / clients_per_actor)``; 1 when both are 0).
    """
    from pf2lora_ray.runtime.ray_backend import requested_actors

    res = cfg.resources
    actor = {"CPU": res.num_cpus_per_actor, "GPU": res.num_gpus_per_actor}
    actor = {r: q for r, q in actor.items() if q > 0}
    if cfg.runtime.backend == "local":
        driver = {**actor, "CPU": driver_cpus or res.num_cpus_per_actor}
        if driver["CPU"] <= 0:
            raise ConfigError(
                "resources.num_cpus_per_actor: 0 leaves a local-backend trial no CPU; "
                "set it > 0 or set driver_cpus in the space"
            )
        return [driver]
    if not actor:
        raise ConfigError(
            "resources.num_cpus_per_actor: a trial reserves its actors, so they must ask for "
            "some CPU or GPU; both num_cpus_per_actor and num_gpus_per_actor are 0"
        )
    count = requested_actors(cfg) or 1
    return [{"CPU": driver_cpus or RAY_DRIVER_CPUS}] + [dict(actor) for _ in range(count)]


def concurrency(bundles: Sequence[dict[str, float]], total: dict[str, float], cap: int) -> int:
    """How many trials of ``bundles`` fit in the cluster's ``total`` resources (<= ``cap``).

    Raises:
        ConfigError: not even one trial fits (it would wait forever without a word).
    """
    need: dict[str, float] = {}
    for bundle in bundles:
        for r, q in bundle.items():
            need[r] = need.get(r, 0.0) + q
    fits = min((math.floor(total.get(r, 0.0) / q + _EPS) for r, q in need.items()), default=1)
    if fits < 1:
        have = {r: total.get(r, 0.0) for r in need}
        raise ConfigError(
            f"one trial reserves {need} (driver {bundles[0]} + {len(bundles) - 1} actor "
            f"bundle(s)) but the cluster has {have}; lower resources.num_cpus_per_actor / "
            "resources.num_actors or the space's driver_cpus"
        )
    return min(fits, cap) if cap else fits
