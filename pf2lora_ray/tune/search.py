"""``run_tune``: check everything, reserve trials by placement group, run Ray Tune."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pf2lora_ray import seeds
from pf2lora_ray.config import Config, FedConfig, read_yaml
from pf2lora_ray.results import write_text
from pf2lora_ray.runtime.sizing import start_ray
from pf2lora_ray.storage import Location, check_folder, location
from pf2lora_ray.tune.outputs import (
    TRIALS_FILE,
    TrialsWriter,
    complete_from_runs,
    overrides_of,
    write_best,
)
from pf2lora_ray.tune.space import Space, candidate_configs, load_space, trial_config
from pf2lora_ray.tune.trial import concurrency, run_trial, trial_bundles
from pf2lora_ray.validate import DataCheck, UsageError, validate_run

SPEC_FILE = "tune_spec.yaml"


def ray_storage(loc: Location) -> dict[str, Any]:
    """Ray Tune's ``storage_path`` / ``storage_filesystem`` for ``loc``: the same file system.

    Tune would otherwise open the URI again itself (also through pyarrow.fs).
    """
    if loc.is_local:
        return {"storage_path": loc.path}
    return {"storage_path": loc.path, "storage_filesystem": loc.fs}


def _check_out(out: Location, spec: dict[str, Any], resume: bool) -> None:
    spec_path = out / SPEC_FILE
    if not resume:
        if (out / "tune").exists() or spec_path.exists():
            raise UsageError(
                f"--out {out} already holds a tune; pass --resume to continue it or choose "
                "a new folder"
            )
        return
    where = ray_storage(out / "tune")
    restorable = tune.Tuner.can_restore(where["storage_path"], where.get("storage_filesystem"))
    if not restorable or not spec_path.is_file():
        raise UsageError(f"--resume: {out} holds no tune to resume ({out / 'tune'} missing)")
    try:
        saved = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"{spec_path}: malformed YAML: {err}") from err
    if saved != spec:
        raise UsageError(
            f"--resume: the base config or space differs from the tune in {out} "
            f"(saved in {spec_path}); resume with the same CONFIG, --set, --space and --samples"
        )


def _unfinished(out: Location, space: Space, samples: int) -> int:
    """Trials of the tune in ``out`` not yet terminated or errored, per its saved state."""
    grid_points = math.prod(len(d.args) for d in space.params.values() if d.kind == "grid")
    expected = grid_points * (samples if space.search == "random" else 1)
    where = ray_storage(out / "tune")
    trials = tune.ExperimentAnalysis(
        where["storage_path"], storage_filesystem=where.get("storage_filesystem")
    ).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(expected, len(trials)) - done


def run_tune(
    cfg: Config,
    space_path: str | Path,
    out: str | Path | Location,
    samples: int = 4,
    resume: bool = False,
) -> Location:
    """Search ``space_path`` around ``cfg`` with Ray Tune; returns the path of best.yaml.

    Args:
        cfg: the base config; trials set the space's values on it.
        space_path: SPACE.yaml (module docstring).
        out: the tune folder (layout in the package docstring): a local path or a URI.
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
    if space.split == "test":
        print(
            f"tune: selecting on the test split ({space.metric}); name val.<metric>.<stat> "
            "to choose on validation rows and keep test for reporting",
            file=sys.stderr,
        )
    checked: dict[str, DataCheck] = {}
    for candidate in candidate_configs(cfg, space):  # names, data and partition, as `run` does
        validate_run(candidate, checked)
    out = location(out)
    check_folder(out, "--out")
    spec = {"base": overrides_of(cfg), "space": read_yaml(space_path), "samples": samples}
    _check_out(out, spec, resume)
    started = start_ray(cfg)
    try:
        base_trial = trial_config(cfg, space.fixed)
        bundles = trial_bundles(base_trial, space.driver_cpus)
        limit = concurrency(bundles, ray.cluster_resources(), space.max_concurrent)
        out.mkdir()
        write_text(yaml.safe_dump(spec, sort_keys=False), out / SPEC_FILE)
        tuner = _tuner(absolute_paths(cfg), space, out, samples, limit, resume)
        grid = tuner.fit()
        unfinished = _unfinished(out, space, samples)
        if unfinished:
            # Tune returns normally from Ctrl-C after saving its state; a best.yaml
            # written now would pick among half-run trials.
            raise KeyboardInterrupt(
                f"tune interrupted with {unfinished} trial(s) unfinished; continue it with "
                "the same command plus --resume"
            )
        complete_from_runs(out, list(space.params))
        if not (out / TRIALS_FILE).is_file():
            first = grid.errors[0] if grid.errors else "no error was recorded"
            raise RuntimeError(f"no trial reported a result; first error: {first}")
        trials = (out / TRIALS_FILE).read_parquet()
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


def first_cut(fed: FedConfig, grace: float) -> int:
    """ASHA's first rung: the first evaluation round at or after ``grace`` of the schedule.

    Evaluations fall every ``fed.eval_every`` rounds and at the last round, so a
    trial is never judged before ``grace * fed.rounds`` rounds (the study's spaces
    use no scheduler at all: every trial runs to the end).
    """
    earliest = max(1, math.ceil(grace * fed.rounds - 1e-9))
    return min(math.ceil(earliest / fed.eval_every) * fed.eval_every, fed.rounds)


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with a relative ``data.path`` made absolute against this process's folder.

    Tune runs each trial in its own working folder, where a path relative to the
    folder the command was started in would name nothing.
    """
    path = cfg.data.path
    if path is None or Path(path).is_absolute() or not Path(path).exists():
        return cfg
    data = dataclasses.replace(cfg.data, path=str(Path(path).resolve()))
    return dataclasses.replace(cfg, data=data)


def _tuner(
    cfg: Config, space: Space, out: Location, samples: int, limit: int, resume: bool
) -> tune.Tuner:
    where = out.portable  # a trial reopens it on its own node

    def pf2lora_trial(values: dict[str, Any]) -> None:
        run_trial(values, cfg, space, where)

    def resources(values: dict[str, Any]) -> tune.PlacementGroupFactory:
        trial_cfg = trial_config(cfg, {**space.fixed, **values})
        return tune.PlacementGroupFactory(trial_bundles(trial_cfg, space.driver_cpus))

    trainable = tune.with_resources(pf2lora_trial, resources)
    storage = ray_storage(out)
    if resume:
        tune_dir = ray_storage(out / "tune")
        return tune.Tuner.restore(
            tune_dir["storage_path"],
            trainable,
            resume_errored=True,
            storage_filesystem=tune_dir.get("storage_filesystem"),
        )
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
        grace = min(first_cut(fed, space.grace) for fed in rounds)
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
            **storage,
            name="tune",
            callbacks=[TrialsWriter(out / TRIALS_FILE, list(space.params))],
            verbose=0 if cfg.runtime.quiet else 1,
        ),
    )
