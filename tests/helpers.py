"""Small builders shared by tests (tiny configs, so tests run in seconds on 2 cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pf2lora_ray.config import Config, load_config

SYNTHETIC_JOB = "jobs/synthetic_rank.yaml"


def tiny_synthetic(*sets: str, backend: str = "local") -> Config:
    """The synthetic job shrunk to a few seconds, with extra ``key=value`` overrides."""
    base = [
        f"runtime.backend={backend}",
        "runtime.quiet=true",
        "fed.rounds=3",
        "fed.eval_every=3",
        "synthetic.train_size=64",
        "synthetic.test_size=32",
    ]
    return load_config(SYNTHETIC_JOB, [*base, *sets])


def synthetic_run_args(out: str | Path, *sets: str) -> list[str]:
    """``pf2lora run`` arguments for the synthetic job into ``out`` with ``--set`` overrides."""
    overrides = [x for s in sets for x in ("--set", s)]
    return ["run", SYNTHETIC_JOB, "--quiet", "--out", str(out), *overrides]


def cli_process(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m pf2lora_ray.cli ARGS`` in a child process (a crash exits only it)."""
    return subprocess.run(
        [sys.executable, "-m", "pf2lora_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
