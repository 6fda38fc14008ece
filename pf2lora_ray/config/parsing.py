"""Nested overrides (YAML, ``--set a.b=v``) -> a validated :class:`Config`, and back.

Every value goes through one type check against the dataclass annotations, so
an unknown key, a wrong type or an impossible value raises :class:`ConfigError`
naming the dotted key before anything runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pf2lora_ray.config.errors import ConfigError, check
from pf2lora_ray.config.sections import Config

#: Top-level keys of a job file that make it several runs (pf2lora_ray.config.jobs).
JOB_KEYS = ("sweep", "seeds")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key; known keys here: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, tp, value = f"{prefix}{f.name}", hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            check(value is None or isinstance(value, dict), key, "must be a mapping")
            kwargs[f.name] = _build(tp, value or {}, f"{key}.")
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested overrides of the defaults."""
    check(isinstance(data, dict), "config", f"must be a mapping, got {type(data).__name__}")
    return _build(Config, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) for YAML/JSON."""
    out = dataclasses.asdict(cfg)

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(out)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists are kept as values."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating levels; errors name the key."""
    parts = key.split(".")
    check(all(parts), key, "malformed key")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        check(isinstance(node, dict), key, f"{part!r} is not a section")
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` (value read as YAML: ``3``, ``0.1``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from err
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (safe loader: data only, never code)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: malformed YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None, sets: typing.Sequence[str] = (), extra: dict | None = None
) -> Config:
    """Defaults <- YAML overrides at ``path`` <- ``extra`` dotted dict <- ``--set`` items."""
    data = read_yaml(path) if path is not None else {}
    for key in JOB_KEYS:
        if key in data:
            raise ConfigError(
                f"{key}: this job is several runs, which `pf2lora run` expands; "
                "`pf2lora tune` and load_config take a single-run job "
                "(in Python: pf2lora_ray.config.expand_job)"
            )
    return build_config(data, sets, extra)


def build_config(
    data: dict[str, Any], sets: typing.Sequence[str] = (), extra: dict | None = None
) -> Config:
    """Like :func:`load_config` from an already-read nested override mapping."""
    data = copy.deepcopy(data)
    for key, value in (extra or {}).items():
        set_dotted(data, key, value)
    for item in sets:
        set_dotted(data, *parse_set(item))
    return from_dict(data)


def config_hash(cfg: Config, ignore: typing.Iterable[str] = ()) -> str:
    """Stable hash of the parts of the config that change results.

    Runtime, resources, checkpoint and fault settings are left out so a run can
    resume on a different cluster shape.
    """
    d = flatten(to_dict(cfg))
    skip = ("runtime.", "resources.", "checkpoint.", "faults.", "fed.rounds", *ignore)
    kept = {k: v for k, v in d.items() if not k.startswith(skip)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
