"""Ray Tune search over config keys: ``pf2lora tune CONFIG --space SPACE.yaml``.

Each trial is one full federated simulation (:func:`run_experiment`) of the base
config with the trial's sampled values set. It reports the across-client
aggregates of every evaluation round to Tune (``test.mse.mean``, ``train.loss.mean``,
...), together with ``round``, the time axis of the ASHA scheduler.

SPACE.yaml::

    metric: test.mse.mean      # <split>.<metric>.<mean|std|worst_decile>, reported each eval round
    mode: min                  # min | max (must agree with the metric's direction)
    search: random             # random: --samples draws | grid: every key is a grid, run once
    scheduler: asha            # asha: stop bad trials early on `round` | none
    max_concurrent: 0          # 0 = as many trials as the cluster's resources hold
    driver_cpus: 0.5           # optional: CPUs of a trial's driver bundle (see trial_bundles)
    fixed:                     # optional: dotted overrides applied to every trial
      resources.num_cpus_per_actor: 0.5
    space:                     # dotted config key -> one distribution
      adapter.r: {grid: [2, 4]}                    # every value (cartesian with other grids)
      adapter.r_personal: {choice: [1, 2, 4]}      # one value drawn per trial
      adapter.alpha: {uniform: [1.0, 8.0]}         # float in [low, high]
      algorithm.lr: {loguniform: [0.001, 0.03]}    # float, log-uniform in [low, high]
      fed.local_steps: {randint: [5, 20]}          # int in [low, high), as in Ray Tune

With ``search: random`` there are ``--samples`` draws; grid keys multiply them
(Ray Tune's semantics). Every key and every grid/choice value (every bound of a
range) is checked by building the trial config before Ray starts, so a bad key
or value is a :class:`ConfigError` naming it.

A trial reserves its client actors with itself (one placement group per trial:
bundle 0 the trial's driver, bundles 1.. one per actor), so concurrent trials
never oversubscribe the cluster. Results under ``OUT``::

    tune/                Ray Tune's own experiment folder (what --resume restores)
    trials/<trial_id>/   each trial's normal run folder (config.yaml, metrics.parquet, ...)
    trials.parquet       one row per (trial_id, round): reported metrics + config/<key> columns
    best.yaml            the best trial as a ready job: base overrides + fixed + best values
    tune_spec.yaml       the base overrides, space and samples, checked again on --resume
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pf2lora_ray import seeds
from pf2lora_ray.config import (
    Config,
    ConfigError,
    flatten,
    from_dict,
    read_yaml,
    set_dotted,
    to_dict,
)
from pf2lora_ray.driver import DriverState, RoundReport, is_eval_round
from pf2lora_ray.experiment import UsageError, run_experiment
from pf2lora_ray.metrics import HIGHER_IS_BETTER
from pf2lora_ray.results import aggregate_rows, write_parquet, write_text

SPLITS = ("train", "test")
STATS = ("mean", "std", "worst_decile")
SEARCHES = ("random", "grid")
SCHEDULERS = ("asha", "none")
SPACE_KEYS = ("metric", "mode", "search", "scheduler", "max_concurrent", "driver_cpus")
SPACE_KEYS += ("fixed", "space")
TRIALS_FILE = "trials.parquet"
BEST_FILE = "best.yaml"
SPEC_FILE = "tune_spec.yaml"
CONFIG_PREFIX = "config/"
# The driver only aggregates under the Ray backend; half a CPU leaves room for actors.
RAY_DRIVER_CPUS = 0.5
_EPS = 1e-9


# ---------------------------------------------------------------- the space


@dataclass(frozen=True)
class Distribution:
    """One searched key: ``kind`` is grid | choice | uniform | loguniform | randint."""

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The Ray Tune sampler (or grid_search marker) for this distribution."""
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def candidates(self) -> list[Any]:
        """Values checked against the config: all listed values, or a range's bounds."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [float(low), float(high)]


def _distribution(key: str, spec: Any) -> Distribution:
    kinds = ("grid", "choice", "uniform", "loguniform", "randint")
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds):
        raise ConfigError(
            f"space.{key}: expected one of {{{', '.join(f'{k}: [...]' for k in kinds)}}}, "
            f"got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if not isinstance(args, list) or not args:
        raise ConfigError(f"space.{key}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("grid", "choice"):
        return Distribution(kind, tuple(args))
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != 2 or not numbers or not args[0] < args[1]:
        raise ConfigError(f"space.{key}: {kind} needs numbers [low, high], low < high; got {args}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"space.{key}: loguniform needs low > 0, got {args}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"space.{key}: randint needs integer bounds, got {args}")
    return Distribution(kind, tuple(args))


@dataclass(frozen=True)
class Space:
    """A parsed, validated SPACE.yaml (see the module docstring)."""

    metric: str
    mode: str
    params: dict[str, Distribution]
    search: str = "random"
    scheduler: str = "asha"
    max_concurrent: int = 0
    driver_cpus: float | None = None
    fixed: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """Flat ``{dotted key: Tune sampler}`` for ``Tuner(param_space=...)``."""
        return {key: dist.to_tune() for key, dist in self.params.items()}


def _check_metric(metric: Any, mode: Any) -> None:
    parts = metric.split(".") if isinstance(metric, str) else []
    if len(parts) != 3 or parts[0] not in SPLITS or parts[2] not in STATS:
        raise ConfigError(
            f"metric: expected <split>.<metric>.<stat> with split in {list(SPLITS)} and stat in "
            f"{list(STATS)} (e.g. test.accuracy.mean), got {metric!r}"
        )
    if parts[1] not in HIGHER_IS_BETTER:
        raise ConfigError(f"metric: unknown metric {parts[1]!r}; known: {sorted(HIGHER_IS_BETTER)}")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode: must be min or max, got {mode!r}")
    if parts[2] != "std":  # a spread is always better low; means and deciles follow the metric
        right = "max" if HIGHER_IS_BETTER[parts[1]] else "min"
        if mode != right:
            raise ConfigError(f"mode: {metric} is better when {right}imised; use mode: {right}")


def parse_space(data: dict[str, Any], base: Config) -> Space:
    """Validate a SPACE mapping against ``base``; every key and value is checked.

    Raises:
        ConfigError: an unknown SPACE key, distribution or config key, a value the
            config rejects, or a bad metric/mode; the message names it.
    """
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown space key; known: {list(SPACE_KEYS)}")
    _check_metric(data.get("metric"), data.get("mode"))
    search, scheduler = data.get("search", "random"), data.get("scheduler", "asha")
    if search not in SEARCHES:
        raise ConfigError(f"search: must be one of {list(SEARCHES)}, got {search!r}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler: must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    max_concurrent = data.get("max_concurrent", 0)
    if type(max_concurrent) is not int or max_concurrent < 0:
        raise ConfigError(f"max_concurrent: must be an integer >= 0, got {max_concurrent!r}")
    driver_cpus = data.get("driver_cpus")
    if driver_cpus is not None and not (isinstance(driver_cpus, (int, float)) and driver_cpus > 0):
        raise ConfigError(f"driver_cpus: must be a number > 0, got {driver_cpus!r}")
    fixed, raw = data.get("fixed") or {}, data.get("space")
    if not isinstance(fixed, dict):
        raise ConfigError(f"fixed: must map dotted config keys to values, got {fixed!r}")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("space: must map at least one dotted config key to a distribution")
    params = {str(key): _distribution(str(key), spec) for key, spec in raw.items()}
    if search == "grid":
        for key, dist in params.items():
            if dist.kind != "grid":
                raise ConfigError(
                    f"space.{key}: search: grid needs every key as {{grid: [...]}}, got "
                    f"{dist.kind}; use search: random to mix grids and distributions"
                )
    trial_config(base, fixed)
    for key, dist in params.items():
        for value in dist.candidates():
            trial_config(base, {**fixed, key: value})
    return Space(
        data["metric"],
        data["mode"],
        params,
        search,
        scheduler,
        max_concurrent,
        None if driver_cpus is None else float(driver_cpus),
        dict(fixed),
    )


def load_space(path: str | Path, base: Config) -> Space:
    """Read and validate SPACE.yaml at ``path`` (errors name the file and the key)."""
    try:
        return parse_space(read_yaml(path), base)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


# ---------------------------------------------------------------- one trial


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """``base`` with dotted ``values`` set, quiet, checkpointing at every eval round.

    Checkpoints at eval rounds let an interrupted trial continue from the round
    it last reported when the tune is resumed.
    """
    data = to_dict(base)
    for key, value in values.items():
        set_dotted(data, key, value)
    data["runtime"]["quiet"] = True
    if not data["checkpoint"]["every"]:
        data["checkpoint"]["every"] = data["fed"]["eval_every"]
    return from_dict(data)


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

    def __init__(self, metric: str, run_dir: Path | None = None) -> None:
        self.metric, self.run_dir = metric, run_dir

    def on_start(self, state: DriverState) -> None:
        if state.round == 0 or self.run_dir is None or not is_eval_round(state.cfg, state.round):
            return
        rows = pd.read_parquet(self.run_dir / "metrics.parquet")
        rows = rows[rows["client_id"].isna() & (rows["round"] == state.round)]
        metrics = {f"{r.split}.{r.metric}": float(r.value) for r in rows.itertuples()}
        if self.metric in metrics:
            tune.report({**metrics, "round": state.round})

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        if report.eval is None:
            return
        metrics = round_metrics(report)
        if self.metric not in metrics:
            raise ConfigError(
                f"metric: {self.metric!r} is not reported by this job; it reports {sorted(metrics)}"
            )
        tune.report({**metrics, "round": report.round})

    def on_end(self, state: DriverState, status: str) -> None:
        pass


def run_trial(values: dict[str, Any], base: Config, space: Space, out: Path) -> None:
    """One Tune trial: the base config with ``values``, run into ``out/trials/<trial_id>``.

    A trial restarted by ``--resume`` continues from its run's latest checkpoint;
    without one its partial folder is cleared and it starts over.
    """
    cfg = trial_config(base, {**space.fixed, **values})
    run_dir = out / "trials" / tune.get_context().get_trial_id()
    resume = (run_dir / "checkpoints" / "latest.json").is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
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


# ---------------------------------------------------------------- outputs


class TrialsWriter(tune.Callback):
    """Tune callback: rewrite ``trials.parquet`` atomically after every reported result.

    Rows are keyed by (trial_id, round), so a trial restarted on resume
    overwrites the rounds it reports again. Earlier rows are read back in
    :meth:`setup` (not ``__init__``: Tune restores this object from its pickle).
    """

    def __init__(self, path: Path, keys: Sequence[str]) -> None:
        self.path, self.keys = path, list(keys)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}

    def setup(self, **info: Any) -> None:
        self.rows = {}
        if self.path.is_file():
            for row in pd.read_parquet(self.path).to_dict("records"):
                self.rows[(row["trial_id"], int(row["round"]))] = row

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        row: dict[str, Any] = {"trial_id": trial.trial_id, "round": int(result["round"])}
        row |= {k: v for k, v in result.items() if k.split(".")[0] in SPLITS}
        row |= {f"{CONFIG_PREFIX}{k}": trial.config[k] for k in self.keys}
        self.rows[(row["trial_id"], row["round"])] = row
        frame = pd.DataFrame([self.rows[k] for k in sorted(self.rows)])
        write_parquet(frame, self.path)


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


def write_best(trials: pd.DataFrame, base: Config, space: Space, out: Path) -> Path:
    """Write ``best.yaml``: base overrides + fixed + the best trial's values; returns its path.

    The best trial is the one whose last reported ``space.metric`` is best (the
    same rule as ``pf2lora report``). The file is checked to build a valid config.
    """
    from analysis.tables import best_trial

    best = best_trial(trials, space.metric, space.mode)
    job = overrides_of(base)
    for key, value in space.fixed.items():
        set_dotted(job, key, value)
    for key in space.params:
        set_dotted(job, key, _plain(best[f"{CONFIG_PREFIX}{key}"]))
    from_dict(copy.deepcopy(job))
    header = (
        f"# Best of {trials['trial_id'].nunique()} trials by {space.metric} ({space.mode}): "
        f"{float(best[space.metric]):.6g}, trial {best['trial_id']}.\n"
        f"# Run it with: pf2lora run {out / BEST_FILE}\n"
    )
    path = out / BEST_FILE
    write_text(header + yaml.safe_dump(job, sort_keys=False), path)
    return path


# ---------------------------------------------------------------- the tune


def _start_ray(cfg: Config) -> bool:
    """Reuse an initialised Ray, else connect/start one; returns whether we started it."""
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS") or None
    # Token authentication stays Ray's default (on).
    ray.init(address=address, include_dashboard=cfg.runtime.dashboard)
    return True


def _check_out(out: Path, spec: dict[str, Any], resume: bool) -> None:
    spec_path = out / SPEC_FILE
    if not resume:
        if (out / "tune").exists() or spec_path.exists():
            raise UsageError(
                f"--out {out} already holds a tune; pass --resume to continue it or choose "
                "a new folder"
            )
        return
    if not tune.Tuner.can_restore(str(out / "tune")) or not spec_path.is_file():
        raise UsageError(f"--resume: {out} holds no tune to resume ({out / 'tune'} missing)")
    saved = yaml.safe_load(spec_path.read_text())
    if saved != spec:
        raise UsageError(
            f"--resume: the base config or space differs from the tune in {out} "
            f"(saved in {spec_path}); resume with the same CONFIG, --set, --space and --samples"
        )


def _unfinished(out: Path, space: Space, samples: int) -> int:
    """Trials of the tune in ``out`` not yet terminated or errored, per its saved state."""
    grid_points = math.prod(len(d.args) for d in space.params.values() if d.kind == "grid")
    expected = grid_points * (samples if space.search == "random" else 1)
    trials = tune.ExperimentAnalysis(str(out / "tune")).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(expected, len(trials)) - done


def run_tune(
    cfg: Config,
    space_path: str | Path,
    out: str | Path,
    samples: int = 4,
    resume: bool = False,
) -> Path:
    """Search ``space_path`` around ``cfg`` with Ray Tune; returns the path of best.yaml.

    Args:
        cfg: the base config; trials set the space's values on it.
        space_path: SPACE.yaml (module docstring).
        out: the tune folder (layout in the module docstring).
        samples: random draws (``search: random``); a grid search runs each point once.
        resume: continue the interrupted tune in ``out``.

    Raises:
        ConfigError: a bad space, or a trial that cannot fit the cluster (before any runs).
        UsageError: ``out`` already holds a tune (without ``resume``) or none (with it).
        RuntimeError: no trial reported a result.
        KeyboardInterrupt: the tune was interrupted (its state is saved for ``resume``).
    """
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    space = load_space(space_path, cfg)
    out = Path(out).resolve()
    spec = {"base": overrides_of(cfg), "space": read_yaml(space_path), "samples": samples}
    _check_out(out, spec, resume)
    started = _start_ray(cfg)
    try:
        base_trial = trial_config(cfg, space.fixed)
        bundles = trial_bundles(base_trial, space.driver_cpus)
        limit = concurrency(bundles, ray.cluster_resources(), space.max_concurrent)
        out.mkdir(parents=True, exist_ok=True)
        write_text(yaml.safe_dump(spec, sort_keys=False), out / SPEC_FILE)
        tuner = _tuner(cfg, space, out, samples, limit, resume)
        grid = tuner.fit()
        unfinished = _unfinished(out, space, samples)
        if unfinished:
            # Tune returns normally from Ctrl-C after saving its state; a best.yaml
            # written now would pick among half-run trials.
            raise KeyboardInterrupt(
                f"tune interrupted with {unfinished} trial(s) unfinished; continue it with "
                "the same command plus --resume"
            )
        if not (out / TRIALS_FILE).is_file():
            first = grid.errors[0] if grid.errors else "no error was recorded"
            raise RuntimeError(f"no trial reported a result; first error: {first}")
        trials = pd.read_parquet(out / TRIALS_FILE)
        best = write_best(trials, cfg, space, out)
        if not cfg.runtime.quiet:
            print(
                f"{trials['trial_id'].nunique()} trials ({len(grid.errors)} failed), "
                f"up to {limit} at a time; best config in {best}"
            )
        return best
    finally:
        if started:
            ray.shutdown()


def _tuner(
    cfg: Config, space: Space, out: Path, samples: int, limit: int, resume: bool
) -> tune.Tuner:
    def pf2lora_trial(values: dict[str, Any]) -> None:
        run_trial(values, cfg, space, out)

    def resources(values: dict[str, Any]) -> tune.PlacementGroupFactory:
        trial_cfg = trial_config(cfg, {**space.fixed, **values})
        return tune.PlacementGroupFactory(trial_bundles(trial_cfg, space.driver_cpus))

    trainable = tune.with_resources(pf2lora_trial, resources)
    if resume:
        return tune.Tuner.restore(str(out / "tune"), trainable, resume_errored=True)
    scheduler = None
    if space.scheduler == "asha":
        # ASHA stops every trial at max_t, so it must be the longest run the space allows.
        rounds = [trial_config(cfg, space.fixed).fed]
        if "fed.rounds" in space.params:
            rounds = [
                trial_config(cfg, {**space.fixed, "fed.rounds": v}).fed
                for v in space.params["fed.rounds"].candidates()
            ]
        max_t = max(fed.rounds for fed in rounds)
        grace = min(min(fed.eval_every, fed.rounds) for fed in rounds)
        scheduler = ASHAScheduler(time_attr="round", max_t=max_t, grace_period=grace)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            scheduler=scheduler,
            # The variant generator caps concurrency itself (Tune ignores max_concurrent_trials
            # next to one); a seeded one makes the sampled configs reproducible.
            search_alg=BasicVariantGenerator(
                random_state=seeds.derive(cfg.seed, seeds.TUNE_SEARCH) % 2**32,
                max_concurrent=limit,
            ),
            num_samples=samples if space.search == "random" else 1,
        ),
        run_config=tune.RunConfig(
            storage_path=str(out),
            name="tune",
            callbacks=[TrialsWriter(out / TRIALS_FILE, list(space.params))],
            verbose=0 if cfg.runtime.quiet else 1,
        ),
    )
