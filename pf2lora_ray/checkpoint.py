"""Checkpoints: safetensors + JSON only (never pickle), written atomically.

Layout under ``<run>/checkpoints/``::

    round_000010/shared.safetensors     theta, name-keyed
    round_000010/personal.safetensors   every client's phi_k, keys "<client>/<name>"
    round_000010/meta.json              round, run id, config hash, seed
    latest.json                         {"round": 10, "dir": "round_000010"}

A checkpoint directory is first written under a temporary name and renamed into
place, and ``latest.json`` is replaced last, so a crash at any point leaves the
previous checkpoint intact. All random draws derive from (seed, round, client),
so the seed and round number are the whole RNG state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pf2lora_ray.client import Arrays
from pf2lora_ray.config import Config, config_hash
from pf2lora_ray.driver import DriverState, RoundReport
from pf2lora_ray.results import write_text

KEEP = 2  # checkpoints kept on disk


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or belongs to another config."""


def save_checkpoint(
    run_dir: Path, cfg: Config, round_: int, theta: Arrays, personal: dict[int, Arrays]
) -> Path:
    """Write round ``round_``'s checkpoint and point latest.json at it."""
    root = Path(run_dir) / "checkpoints"
    name = f"round_{round_:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in theta.items()}, str(tmp / "shared.safetensors")
    )
    flat = {
        f"{k}/{n}": np.ascontiguousarray(v)
        for k, arrs in sorted(personal.items())
        for n, v in arrs.items()
    }
    save_file(flat, str(tmp / "personal.safetensors"))
    meta = {
        "round": round_,
        "config_hash": config_hash(cfg),
        "seed": cfg.seed,
        "algorithm": cfg.algorithm.name,
        "clients": sorted(int(k) for k in personal),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(json.dumps({"round": round_, "dir": name}), root / "latest.json")
    for old in sorted(p for p in root.glob("round_*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, cfg: Config) -> tuple[int, Arrays, dict[int, Arrays]]:
    """(round, theta, personal) of the latest checkpoint, checked against ``cfg``."""
    root = Path(run_dir) / "checkpoints"
    try:
        latest = json.loads((root / "latest.json").read_text())
        ckpt = root / latest["dir"]
        meta = json.loads((ckpt / "meta.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from ({err.filename})") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{root}: checkpoint metadata is malformed: {err}") from err
    if meta.get("config_hash") != config_hash(cfg):
        raise CheckpointError(
            f"{ckpt}: checkpoint was written by a different config "
            f"(hash {meta.get('config_hash')}, this config {config_hash(cfg)}); "
            "resume with the run's own config.yaml"
        )
    try:
        theta = load_file(str(ckpt / "shared.safetensors"))
        flat = load_file(str(ckpt / "personal.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt}: checkpoint file is truncated or unreadable: {err}") from err
    personal: dict[int, Arrays] = {}
    for key, value in flat.items():
        client, name = key.split("/", 1)
        personal.setdefault(int(client), {})[name] = value
    return int(meta["round"]), theta, personal


def restore_latest(run_dir: Path, cfg: Config, backend) -> tuple[Arrays, int]:
    """Load the latest checkpoint into ``backend``; returns (theta, round)."""
    round_, theta, personal = load_checkpoint(run_dir, cfg)
    backend.set_personal(personal)
    return theta, round_


class CheckpointWriter:
    """Driver callback: checkpoint every ``checkpoint.every`` rounds and after the last."""

    def __init__(self, run_dir: str | Path, cfg: Config) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        every, last = self.cfg.checkpoint.every, self.cfg.fed.rounds
        crash = self.cfg.faults.crash_driver_at_round
        if (every and report.round % every == 0) or report.round in (last, crash):
            save_checkpoint(
                self.run_dir, self.cfg, report.round, state.theta, state.backend.snapshot()
            )

    def on_end(self, state: DriverState, status: str) -> None:
        pass
