"""Checkpoints: safetensors + JSON only (never pickle), written atomically.

Layout under ``<run>/checkpoints/``::

    round_000010/shared.safetensors     theta, name-keyed
    round_000010/personal.safetensors   every client's phi_k, keys "<client>/<name>"
    round_000010/placement.safetensors  which actor is home to which client (Ray backend)
    round_000010/meta.json              round, run id, config hash, seed
    latest.json                         {"round": 10, "dir": "round_000010"}

``run`` may be a local folder or a URI (:mod:`pf2lora_ray.storage`). Locally a
checkpoint directory is first written under a temporary name and renamed into
place; on an object store (no rename) its files are PUT whole under their
final names. Either way ``latest.json`` is replaced last and is the only thing
a reader follows, so a crash at any point leaves the previous checkpoint intact.
All random draws derive from (seed, round, client), so the seed and round
number are the whole RNG state.

The placement (``Backend.placement_state``) is saved so that ``--resume`` puts
every client back on the actor that held it: the first round after a resume
then moves exactly the state an uninterrupted run would have moved. Results do
not depend on it; only which state moves between actors does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pf2lora_ray.client import Arrays
from pf2lora_ray.config import Config, config_hash
from pf2lora_ray.driver import DriverState, RoundReport
from pf2lora_ray.storage import Location, StorageError, location

KEEP = 2  # checkpoints kept on disk
PLACEMENT = "placement.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or belongs to another config."""


def save_checkpoint(
    run_dir: str | Path | Location,
    cfg: Config,
    round_: int,
    theta: Arrays,
    personal: dict[int, Arrays],
    placement: Arrays | None = None,
) -> Location:
    """Write round ``round_``'s checkpoint and point latest.json at it.

    ``placement`` (a backend's ``placement_state()``) is saved when non-empty.
    """
    root = location(run_dir) / "checkpoints"
    name = f"round_{round_:06d}"
    final = root / name
    # Locally: build under a hidden name, rename into place. Object stores have
    # no rename; latest.json, written last, is what makes the checkpoint count.
    staging = root / f".{name}.tmp" if root.is_local else final
    if root.is_local:
        staging.delete()
    (staging / "shared.safetensors").write_with(lambda tmp: save_file(_contiguous(theta), str(tmp)))
    flat = {
        f"{k}/{n}": np.ascontiguousarray(v)
        for k, arrs in sorted(personal.items())
        for n, v in arrs.items()
    }
    (staging / "personal.safetensors").write_with(lambda tmp: save_file(flat, str(tmp)))
    if placement:
        (staging / PLACEMENT).write_with(lambda tmp: save_file(_contiguous(placement), str(tmp)))
    meta = {
        "round": round_,
        "config_hash": config_hash(cfg),
        "seed": cfg.seed,
        "algorithm": cfg.algorithm.name,
        "clients": sorted(int(k) for k in personal),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    if root.is_local:
        final.delete()
        os.replace(staging.path, final.path)
    (root / "latest.json").write_text(json.dumps({"round": round_, "dir": name}))
    for old in root.glob("round_")[:-KEEP]:
        old.delete()
    return final


def _contiguous(arrays: Arrays) -> Arrays:
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def _load_arrays(file: Location) -> dict[str, np.ndarray]:
    """A checkpoint file's arrays; CheckpointError (one line) if it is damaged."""
    try:
        with file.local_file() as path:
            return load_file(str(path))
    except StorageError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: checkpoint file is truncated or unreadable: {err}") from err


def has_checkpoint(run_dir: str | Path | Location) -> bool:
    """Whether ``run_dir`` holds a checkpoint pointer (checkpoints/latest.json)."""
    return (location(run_dir) / "checkpoints" / "latest.json").is_file()


def load_checkpoint(
    run_dir: str | Path | Location, cfg: Config
) -> tuple[int, Arrays, dict[int, Arrays]]:
    """(round, theta, personal) of the latest checkpoint, checked against ``cfg``.

    Raises:
        CheckpointError: missing, damaged, or written by another config (one line).
        StorageError: the store cannot be reached.
    """
    ckpt, round_ = _latest(run_dir, cfg)
    return (round_, *_read_states(ckpt))


def _latest(run_dir: str | Path | Location, cfg: Config) -> tuple[Location, int]:
    """The latest checkpoint's folder and round, its meta.json checked against ``cfg``."""
    run = location(run_dir)
    root = run / "checkpoints"
    try:
        latest = json.loads((root / "latest.json").read_text())
        ckpt = root / str(latest["dir"])
        meta = json.loads((ckpt / "meta.json").read_text())
        round_ = int(meta["round"])
    except FileNotFoundError as err:
        raise CheckpointError(f"{run}: no checkpoint to resume from ({err.filename})") from err
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{root}: checkpoint metadata is malformed: {err}") from err
    if meta.get("config_hash") != config_hash(cfg):
        raise CheckpointError(
            f"{ckpt}: checkpoint was written by a different config "
            f"(hash {meta.get('config_hash')}, this config {config_hash(cfg)}); "
            "resume with the run's own config.yaml"
        )
    return ckpt, round_


def _read_states(ckpt: Location) -> tuple[Arrays, dict[int, Arrays]]:
    """(theta, personal) of the checkpoint folder ``ckpt``."""
    theta = _load_arrays(ckpt / "shared.safetensors")
    flat = _load_arrays(ckpt / "personal.safetensors")
    personal: dict[int, Arrays] = {}
    for key, value in flat.items():
        client, sep, name = key.partition("/")
        if not sep or not client.isdigit():
            raise CheckpointError(
                f"{ckpt / 'personal.safetensors'}: key {key!r} is not '<client>/<parameter>'"
            )
        personal.setdefault(int(client), {})[name] = value
    return theta, personal


def _read_placement(ckpt: Location, num_clients: int) -> Arrays:
    """The checkpoint's placement; empty when it has none (in-process run, older checkpoint).

    Raises:
        CheckpointError: the file is damaged or does not describe ``num_clients`` clients.
    """
    file = ckpt / PLACEMENT
    if not file.is_file():
        return {}
    saved = _load_arrays(file)
    shapes = {k: np.shape(v) for k, v in saved.items()}
    measured = shapes.get("measured_clients", ())
    want = {"home": (num_clients,), "actors": (1,), "measured_clients": measured}
    if shapes == want | {"measured_s": measured} and len(measured) == 1:
        home, actors = saved["home"], int(saved["actors"][0])
        if num_clients == 0 or 0 <= home.min() <= home.max() < actors:
            return saved
    raise CheckpointError(
        f"{file}: is not a placement of {num_clients} clients (it holds {shapes}); want "
        "home (one actor per client, each below the actor count), actors (the count), "
        "measured_clients and measured_s (one time per measured client)"
    )


def restore_latest(run_dir: str | Path | Location, cfg: Config, backend) -> tuple[Arrays, int]:
    """Load the latest checkpoint into ``backend``; returns (theta, round).

    The placement is restored first (``backend.restore_placement``), so each
    client's state goes straight to the actor that held it.

    Raises:
        CheckpointError: missing, damaged, or written by another config (one line).
    """
    ckpt, round_ = _latest(run_dir, cfg)
    theta, personal = _read_states(ckpt)
    backend.restore_placement(_read_placement(ckpt, cfg.fed.num_clients))
    backend.set_personal(personal)
    return theta, round_


class CheckpointWriter:
    """Driver callback: checkpoint every ``checkpoint.every`` rounds and after the last."""

    def __init__(self, run_dir: str | Path | Location, cfg: Config) -> None:
        self.run_dir, self.cfg = location(run_dir), cfg

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        every, last = self.cfg.checkpoint.every, self.cfg.fed.rounds
        crash = self.cfg.faults.crash_driver_at_round
        if (every and report.round % every == 0) or report.round in (last, crash):
            personal, placement = state.backend.snapshot(), state.backend.placement_state()
            save_checkpoint(self.run_dir, self.cfg, report.round, state.theta, personal, placement)

    def on_end(self, state: DriverState, status: str) -> None:
        pass
