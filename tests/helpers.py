"""Small builders shared by tests (tiny configs, so tests run in seconds on 2 cores)."""

from __future__ import annotations

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
