"""SPACE.yaml: which config keys a tune searches, over what, judged by which metric.

A point of the space is run as :func:`trial_config` (the base config with the
point's values set).

The layout is in :mod:`pf2lora_ray.tune`. Parsing checks everything before Ray
starts: the metric and mode, the search and scheduler, and that the base config
with every listed value (every bound of a range) set is a valid config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from pf2lora_ray.config import Config, ConfigError, from_dict, read_yaml, set_dotted, to_dict
from pf2lora_ray.metrics import HIGHER_IS_BETTER

SPLITS = ("train", "val", "test")
STATS = ("mean", "std", "worst_decile")
SEARCHES = ("random", "grid")
SCHEDULERS = ("asha", "none")
SPACE_KEYS = ("metric", "mode", "search", "scheduler", "grace", "max_concurrent", "driver_cpus")
SPACE_KEYS += ("fixed", "space")


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
    scheduler: str = "none"
    max_concurrent: int = 0
    driver_cpus: float | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    grace: float = 0.75

    @property
    def split(self) -> str:
        """The split the search selects on: ``val`` (keeps ``test`` for reporting) or not."""
        return self.metric.split(".", 1)[0]

    def param_space(self) -> dict[str, Any]:
        """Flat ``{dotted key: Tune sampler}`` for ``Tuner(param_space=...)``."""
        return {key: dist.to_tune() for key, dist in self.params.items()}


def _check_metric(metric: Any, mode: Any) -> None:
    parts = metric.split(".") if isinstance(metric, str) else []
    if len(parts) != 3 or parts[0] not in SPLITS or parts[2] not in STATS:
        raise ConfigError(
            f"metric: expected <split>.<metric>.<stat> with split in {list(SPLITS)} and stat in "
            f"{list(STATS)} (e.g. val.accuracy.mean), got {metric!r}"
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
    search, scheduler = data.get("search", "random"), data.get("scheduler", "none")
    if search not in SEARCHES:
        raise ConfigError(f"search: must be one of {list(SEARCHES)}, got {search!r}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler: must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    grace = data.get("grace", 0.75)
    if not (isinstance(grace, (int, float)) and not isinstance(grace, bool) and 0 < grace <= 1):
        raise ConfigError(
            f"grace: ASHA's first cut as a fraction of the schedule, in (0, 1]; got {grace!r}"
        )
    if scheduler == "asha" and grace < 0.75:
        print(
            f"tune: ASHA's first cut at {grace:g} of the schedule can stop slow starters; "
            "a comparison of methods should use grace >= 0.75 or scheduler: none",
            file=sys.stderr,
        )
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
    space = Space(
        data["metric"],
        data["mode"],
        params,
        search,
        scheduler,
        max_concurrent,
        None if driver_cpus is None else float(driver_cpus),
        dict(fixed),
        float(grace),
    )
    configs = candidate_configs(base, space)  # every key and value builds a valid config
    if space.split == "val":
        for cfg in configs:
            if cfg.data.val_fraction == 0:
                raise ConfigError(
                    f"metric: {space.metric} selects on the validation split, but a trial "
                    "would run with data.val_fraction=0 (no validation rows); set it > 0"
                )
    return space


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


def candidate_configs(base: Config, space: Space) -> list[Config]:
    """The base trial config, and one per listed value (or range bound) of every key.

    Raises:
        ConfigError: a key or value the config rejects (the message names it).
    """
    configs = [trial_config(base, space.fixed)]
    for key, dist in space.params.items():
        for value in dist.candidates():
            configs.append(trial_config(base, {**space.fixed, key: value}))
    return configs


def load_space(path: str | Path, base: Config) -> Space:
    """Read and validate SPACE.yaml at ``path`` (errors name the file and the key)."""
    try:
        return parse_space(read_yaml(path), base)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
