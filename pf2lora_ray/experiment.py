"""One run, end to end: pick the backend, attach the callbacks, run the driver loop.

Used by ``pf2lora run`` and by Tune trials; importable for notebooks::

    from pf2lora_ray.config import load_config
    from pf2lora_ray.experiment import run_experiment
    run_experiment(load_config("jobs/synthetic_rank.yaml"), "results/syn")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.driver import Callback, DriverState, RoundReport, run_rounds
from pf2lora_ray.results import RESULT_FILES, ResultsWriter
from pf2lora_ray.runtime.address import check_address
from pf2lora_ray.runtime.base import Backend
from pf2lora_ray.storage import Location, check_folder, location
from pf2lora_ray.tasks.base import ClientRows
from pf2lora_ray.validate import DataCheck, UsageError, unwrap, validate_run

__all__ = ["BACKENDS", "UsageError", "check_out_dir", "holds_run", "preflight", "run_experiment"]


def _local(cfg: Config, rows: ClientRows | None) -> Backend:
    from pf2lora_ray.runtime.local import LocalBackend

    return LocalBackend(cfg, rows)


def _ray(cfg: Config, rows: ClientRows | None) -> Backend:
    from pf2lora_ray.runtime.ray_backend import RayBackend

    return RayBackend(cfg, rows=rows)


# name -> backend(cfg, every client's rows of the split, or None: hosts draw them)
BACKENDS: dict[str, Callable[[Config, ClientRows | None], Backend]] = {
    "local": _local,
    "ray": _ray,
}


class Progress:
    """A tqdm bar over rounds showing the latest mean test metric."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.bar = cfg, None

    def on_start(self, state: DriverState) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.cfg.fed.rounds,
            initial=state.round,
            unit="round",
            desc=self.cfg.algorithm.name,
        )

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        if report.eval is not None:
            means = {}
            for row in report.eval.rows:
                means.setdefault(row["metric"], []).append(row["value"])
            self.bar.set_postfix({m: f"{sum(v) / len(v):.4g}" for m, v in sorted(means.items())})
        self.bar.update(1)

    def on_end(self, state: DriverState, status: str) -> None:
        if self.bar is not None:
            self.bar.close()


def holds_run(out: str | Path | Location) -> bool:
    """Whether ``out`` holds any of a run's result files."""
    out = location(out)
    return any((out / f).exists() for f in RESULT_FILES)


def preflight(cfg: Config, out: str | Path | Location, what: str = "--out") -> Location:
    """Checks that write nothing and start no actor: ``out`` can be a folder (local
    path, or a reachable bucket) and the Ray address, if any, answers.

    Raises:
        StorageError, UsageError: one line naming the location or the address.
    """
    out = location(out)
    check_folder(out, what)
    if cfg.runtime.backend == "ray":
        check_address(cfg.runtime.address)
    return out


def check_out_dir(out: str | Path | Location, resume: bool) -> None:
    """Refuse to write a new run over an existing one (nothing is overwritten)."""
    out = location(out)
    check_folder(out, "--out")
    used = [f for f in RESULT_FILES if (out / f).exists()]
    if used and not resume:
        raise UsageError(
            f"--out {out} already holds a run ({', '.join(used)}); pass --resume to continue it "
            "or choose a new folder"
        )
    probe = out / ".write-test"
    try:
        out.mkdir()
        probe.write_text("")
        probe.delete()
    except OSError as err:
        raise UsageError(f"--out {out} cannot be written: {err.strerror or err}") from err


def run_experiment(
    cfg: Config,
    out: str | Path | Location,
    resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
    variant: str = "",
    validate: bool = True,
    data_check: DataCheck | None = None,
) -> DriverState:
    """Run ``cfg`` writing results to ``out`` (a local folder or a URI); returns the final state.

    ``variant`` labels the run in a sweep (runs.parquet ``variant`` column).
    The run is checked first (:func:`pf2lora_ray.validate.validate_run`: registry
    names, data, partition) unless ``validate`` is False or the caller hands in
    the check as ``data_check``. Its report is recorded in runs.parquet and its
    partition handed to the hosts; without a check, each host draws the partition.
    If bad input still stops the run before its first round (an error raised in
    an actor), a folder this call created is removed again.
    """
    if data_check is None and validate:
        data_check = validate_run(cfg)
    if cfg.runtime.backend not in BACKENDS:
        raise ConfigError(f"runtime.backend: unknown backend {cfg.runtime.backend!r}")
    out = preflight(cfg, out)
    created = not out.exists()
    check_out_dir(out, resume)
    # Resuming a run that never started (e.g. a later sweep member) starts it fresh;
    # `pf2lora run --resume` refuses a folder where no member started (cli.cmd_run).
    resume = resume and holds_run(out)
    rounds = _RoundsDone()
    try:
        return _run(cfg, out, resume, [rounds, *extra_callbacks], variant, data_check)
    except Exception as err:
        if created and not rounds.done and unwrap(err) is not None:
            out.delete()
        raise


class _RoundsDone:
    """Callback counting completed rounds."""

    def __init__(self) -> None:
        self.done = 0

    def on_start(self, state: DriverState) -> None: ...

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        self.done += 1

    def on_end(self, state: DriverState, status: str) -> None: ...


def _run(
    cfg: Config,
    out: Location,
    resume: bool,
    extra_callbacks: list[Callback],
    variant: str,
    data_check: DataCheck | None,
) -> DriverState:
    report, rows = data_check or DataCheck({})
    backend = BACKENDS[cfg.runtime.backend](cfg, rows)
    try:
        theta, start, resume_round = None, 1, None
        if resume:
            from pf2lora_ray.checkpoint import restore_latest

            theta, resume_round = restore_latest(out, cfg, backend)
            start = resume_round + 1
        callbacks: list[Callback] = [ResultsWriter(out, cfg, resume_round, variant, report)]
        callbacks += _checkpoint_callbacks(cfg, out)
        if not cfg.runtime.quiet:
            callbacks.append(Progress(cfg))
        callbacks += list(extra_callbacks)
        return run_rounds(cfg, backend, callbacks, theta=theta, start_round=start)
    finally:
        backend.close()


def _checkpoint_callbacks(cfg: Config, out: Location) -> list[Callback]:
    from pf2lora_ray.checkpoint import CheckpointWriter
    from pf2lora_ray.faults import DriverCrash

    callbacks: list[Callback] = [CheckpointWriter(out, cfg)]
    if cfg.faults.crash_driver_at_round:
        callbacks.append(DriverCrash(cfg))  # after the checkpoint of its round
    return callbacks
