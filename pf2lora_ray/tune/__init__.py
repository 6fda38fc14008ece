"""Ray Tune search over config keys: ``pf2lora tune CONFIG --space SPACE.yaml``.

Each trial is one full federated simulation (:func:`run_experiment`) of the base
config with the trial's sampled values set. It reports the across-client
aggregates of every evaluation round to Tune (``val.mse.mean``, ``test.mse.mean``,
``train.loss.mean``, ...), together with ``round``, the time axis of the ASHA scheduler,
and ``rounds_planned``, so a report tells a trial that ran to the end from a stopped one.

SPACE.yaml::

    metric: val.mse.mean       # <split>.<metric>.<mean|std|worst_decile>; split val | test | train
    mode: min                  # min | max (must agree with the metric's direction)
    search: random             # random: --samples draws | grid: every key is a grid, run once
    scheduler: none            # none: every trial runs to the end | asha (first cut at `grace`)
    grace: 0.75                # asha only: no trial is judged before this share of the rounds
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

Modules: :mod:`~pf2lora_ray.tune.space` (SPACE.yaml, a trial's config),
:mod:`~pf2lora_ray.tune.trial` (one trial: reporting, placement bundles),
:mod:`~pf2lora_ray.tune.outputs` (trials.parquet, best.yaml) and
:mod:`~pf2lora_ray.tune.search` (:func:`run_tune`).
"""

from pf2lora_ray.tune.outputs import (
    BEST_FILE,
    CONFIG_PREFIX,
    TRIALS_FILE,
    TrialsWriter,
    overrides_of,
    write_best,
)
from pf2lora_ray.tune.search import SPEC_FILE, run_tune
from pf2lora_ray.tune.space import Distribution, Space, load_space, parse_space, trial_config
from pf2lora_ray.tune.trial import (
    TuneReporter,
    concurrency,
    round_metrics,
    run_trial,
    trial_bundles,
)

__all__ = [
    "BEST_FILE",
    "CONFIG_PREFIX",
    "SPEC_FILE",
    "TRIALS_FILE",
    "Distribution",
    "Space",
    "TrialsWriter",
    "TuneReporter",
    "concurrency",
    "load_space",
    "overrides_of",
    "parse_space",
    "round_metrics",
    "run_trial",
    "run_tune",
    "trial_bundles",
    "trial_config",
    "write_best",
]
