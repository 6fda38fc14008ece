"""A job file that is several runs: a ``sweep:`` section and/or a ``seeds:`` list.

``sweep:`` takes two forms. A mapping of dotted keys to lists is a Cartesian
product in file order (``{"algorithm.name": [pf2lora, homlora], "fed.rounds": [5, 9]}``
gives ``pf2lora-5``, ``pf2lora-9``, ...). A list of mappings names each variant
explicitly, with an optional ``label``::

    sweep:
      - {label: pf2lora, algorithm.name: pf2lora}
      - {label: pf2lora_fo, algorithm.name: pf2lora, pf2lora.hypergrad: first_order}

``seeds: [0, 1, 2]`` runs every variant once per seed (it replaces ``seed``).
Each run gets a folder under ``--out``: the variant's label, ``<label>-s<seed>``
with ``seeds:``, ``s<seed>`` for a ``seeds:`` job without a sweep. The run's
``variant`` (runs.parquet) is the label without the seed, so analysis groups
runs by variant and pairs them by the ``seed`` column.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

from pf2lora_ray.config.errors import ConfigError, check
from pf2lora_ray.config.parsing import set_dotted

SWEEP_KEY = "sweep"
SEEDS_KEY = "seeds"


@dataclass(frozen=True)
class Variant:
    """One run of a job.

    Attributes:
        folder: its folder under ``--out`` ("" = ``--out`` itself).
        label: its sweep label without the seed ("" outside a sweep).
        overrides: the nested overrides that build its config.
        seed: the seed a ``seeds:`` list gave it (None without one).
    """

    folder: str
    label: str
    overrides: dict[str, Any]
    seed: int | None = None


def split_sweep(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Expand a job's optional ``sweep:`` section into (label, overrides) pairs.

    A job without ``sweep`` gives one unnamed config. ``seeds:`` is left in place;
    :func:`expand_job` handles both.
    """
    sweep = data.get(SWEEP_KEY)
    base = {k: v for k, v in data.items() if k != SWEEP_KEY}
    if sweep is None:
        return [("", base)]
    if isinstance(sweep, dict) and sweep:
        for key, values in sweep.items():
            check(isinstance(values, list) and values, f"{SWEEP_KEY}.{key}", "must be a list")
        variants = [
            dict(zip(sweep, combo, strict=True)) for combo in itertools.product(*sweep.values())
        ]
    elif isinstance(sweep, list) and sweep:
        for i, v in enumerate(sweep):
            check(isinstance(v, dict) and v, f"{SWEEP_KEY}[{i}]", "must be a mapping")
        variants = [dict(v) for v in sweep]
    else:
        raise ConfigError(f"{SWEEP_KEY}: must map dotted keys to lists, or list variants")
    out = []
    for i, variant in enumerate(variants):
        label = str(variant.pop("label", "-".join(str(v) for v in variant.values())))
        check(bool(label) and "/" not in label, f"{SWEEP_KEY}[{i}].label", f"bad label {label!r}")
        overrides = copy.deepcopy(base)
        for key, value in variant.items():
            try:
                set_dotted(overrides, key, value)
            except ConfigError as err:
                raise ConfigError(f"{SWEEP_KEY}[{i}] ({label}): {err}") from err
        out.append((label, overrides))
    labels = [label for label, _ in out]
    check(len(set(labels)) == len(labels), SWEEP_KEY, f"labels must be unique: {labels}")
    return out


def _seeds(data: dict[str, Any]) -> list[int] | None:
    seeds = data.get(SEEDS_KEY)
    if seeds is None:
        return None
    check(
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
        SEEDS_KEY,
        f"must be a non-empty list of integers >= 0, e.g. [0, 1, 2]; got {seeds!r}",
    )
    check(len(set(seeds)) == len(seeds), SEEDS_KEY, f"must not repeat a seed: {seeds}")
    return seeds


def expand_job(data: dict[str, Any]) -> list[Variant]:
    """Every run of a job file: its ``sweep:`` variants, each once per entry of ``seeds:``.

    Raises:
        ConfigError: a malformed ``sweep:`` or ``seeds:``, or a sweep variant that
            sets ``seed`` while ``seeds:`` lists them.
    """
    seeds = _seeds(data)
    variants = split_sweep({k: v for k, v in data.items() if k != SEEDS_KEY})
    if seeds is None:
        return [Variant(label, label, overrides) for label, overrides in variants]
    sweep = data.get(SWEEP_KEY)
    swept = sweep.keys() if isinstance(sweep, dict) else [k for v in sweep or [] for k in v]
    check(
        "seed" not in swept,
        SEEDS_KEY,
        "a sweep variant sets seed too; list seeds in one place (seeds:)",
    )
    out = []
    for label, overrides in variants:
        for seed in seeds:
            run = copy.deepcopy(overrides)
            run["seed"] = seed
            out.append(Variant(f"{label}-s{seed}" if label else f"s{seed}", label, run, seed))
    return out
