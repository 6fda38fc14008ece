"""Experiment configuration: frozen, validated dataclasses, one per concern.

A job file (YAML) holds only *overrides* of the defaults, as a nested mapping;
``--set a.b=v`` overrides one dotted key. Both go through the same type check,
so an unknown key, a wrong type or an impossible value raises
:class:`ConfigError` naming the dotted key before anything runs.

Example::

    cfg = load_config("jobs/synthetic_rank.yaml", sets=["fed.rounds=3"])
    cfg.adapter.r        # 2
    to_dict(cfg)         # nested plain dict, the form written to config.yaml

The package is a leaf: it imports the standard library and PyYAML only, never
torch, the algorithms or the tasks, so building a config is cheap anywhere
(a driver, a notebook, analysis). Names that live in registries
(``algorithm.name``, ``data.name``, ``data.task``) and the data themselves are
checked by :mod:`pf2lora_ray.validate` where a run is loaded.

Modules: :mod:`~pf2lora_ray.config.sections` (the dataclasses),
:mod:`~pf2lora_ray.config.options` (per-algorithm options),
:mod:`~pf2lora_ray.config.parsing` (overrides -> Config, to_dict, hash) and
:mod:`~pf2lora_ray.config.jobs` (``sweep:`` and ``seeds:``).
"""

from pf2lora_ray.config.errors import ConfigError
from pf2lora_ray.config.jobs import SEEDS_KEY, SWEEP_KEY, Variant, expand_job, split_sweep
from pf2lora_ray.config.options import (
    FinetuneConfig,
    HetLoRAConfig,
    PerFedAvgConfig,
    PF2LoRAConfig,
)
from pf2lora_ray.config.parsing import (
    build_config,
    config_hash,
    flatten,
    from_dict,
    load_config,
    parse_set,
    read_yaml,
    set_dotted,
    to_dict,
)
from pf2lora_ray.config.sections import (
    AdapterConfig,
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    FaultsConfig,
    FedConfig,
    ModelConfig,
    RankConfig,
    ResourcesConfig,
    RuntimeConfig,
    SyntheticConfig,
)

__all__ = [
    "SEEDS_KEY",
    "SWEEP_KEY",
    "AdapterConfig",
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FaultsConfig",
    "FedConfig",
    "FinetuneConfig",
    "HetLoRAConfig",
    "ModelConfig",
    "PF2LoRAConfig",
    "PerFedAvgConfig",
    "RankConfig",
    "ResourcesConfig",
    "RuntimeConfig",
    "SyntheticConfig",
    "Variant",
    "build_config",
    "config_hash",
    "expand_job",
    "flatten",
    "from_dict",
    "load_config",
    "parse_set",
    "read_yaml",
    "set_dotted",
    "split_sweep",
    "to_dict",
]
