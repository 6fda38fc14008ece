"""Check a run completely on the driver, before ``--out`` exists or any actor starts.

A config that builds (:mod:`pf2lora_ray.config`) is well-typed and self-consistent;
this module checks what needs the registries and the data:

- registry names: ``algorithm.name`` (:data:`~pf2lora_ray.algorithms.ALGORITHMS`),
  ``data.name`` (:data:`~pf2lora_ray.tasks.TASKS`), and what a task checks when
  it is built (``data.task``, ``data.path``, ``model.name``);
- the data: the file exists and parses, labels are in the task's label set, and
  the split partitions over all ``fed.num_clients`` clients (no client too small),
  via :meth:`Task.check_data <pf2lora_ray.tasks.base.Task.check_data>`. The check
  keeps that partition (every client's rows, :class:`DataCheck`): the run hands
  each host only its own clients' rows, so no host reads or partitions the split.

Every failure raises one of :data:`BAD_INPUT` naming the key, file or row and
what would be right. :func:`one_line` turns such an error, even one that comes
back from a Ray actor wrapped in ``RayTaskError`` / ``ActorDiedError``, into
the single line the command line prints.

Example::

    runs = validate_job(read_yaml("jobs/compare_sst2.yaml"))   # every sweep variant
    for variant, cfg, data in runs:
        run_experiment(cfg, out / variant.folder, variant=variant.label, data_check=data)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pf2lora_ray.config import Config, ConfigError, Variant, build_config, expand_job, to_dict

if TYPE_CHECKING:
    from pf2lora_ray.tasks.base import ClientRows


class UsageError(ValueError):
    """Bad command-line use (e.g. an output folder that already holds a run)."""


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The project's bad-input errors: each names what is wrong and what would be right."""
    # Imported here: checkpoint, partition and tasks import numpy/torch, which
    # validating a config alone does not need.
    from pf2lora_ray.checkpoint import CheckpointError
    from pf2lora_ray.data.partition import PartitionError
    from pf2lora_ray.storage import StorageError
    from pf2lora_ray.tasks.base import DataError

    return (ConfigError, PartitionError, UsageError, DataError, CheckpointError, StorageError)


def check_names(cfg: Config) -> None:
    """``algorithm.name`` and ``data.name`` name registered entries.

    Raises:
        ConfigError: naming the key and the registered choices.
    """
    from pf2lora_ray.algorithms import ALGORITHMS
    from pf2lora_ray.tasks import TASKS

    if cfg.algorithm.name not in ALGORITHMS:
        raise ConfigError(
            f"algorithm.name: unknown algorithm {cfg.algorithm.name!r}; "
            f"choose one of {sorted(ALGORITHMS)}"
        )
    if cfg.data.name not in TASKS:
        raise ConfigError(
            f"data.name: unknown data source {cfg.data.name!r}; choose one of {sorted(TASKS)}"
        )


def _data_key(cfg: Config) -> str:
    """What the data check depends on: runs that share it share one check."""
    d = to_dict(cfg)
    return repr((d["seed"], d["model"], d["data"], d["synthetic"], d["fed"]["num_clients"]))


class DataCheck(NamedTuple):
    """What checking a run's data found, kept for the run.

    Attributes:
        report: ``Task.check_data``'s measures (``{}`` when there are none), which
            the run records in runs.parquet as ``data_check.*`` columns.
        rows: every client's rows of the split (``Task.client_rows``), drawn once
            here and handed to the hosts; None for a task that generates each
            client's data from (seed, client).
    """

    report: dict[str, float]
    rows: ClientRows | None = None


class CheckedRun(NamedTuple):
    """One run of a job, checked: its sweep variant, config and data check."""

    variant: Variant
    cfg: Config
    data: DataCheck


def validate_run(cfg: Config, _checked: dict[str, DataCheck] | None = None) -> DataCheck:
    """Check names and data of one run (see the module docstring).

    When ``data.max_length`` cuts more than 5% of a split's examples, one line on
    stderr says so and names the length that keeps 95% whole. Runs whose data
    check depends on the same keys share one check through ``_checked``.

    Returns:
        The report and the partition (:class:`DataCheck`).

    Raises:
        ConfigError, DataError, PartitionError: the first problem found.
    """
    from pf2lora_ray.tasks import task_for
    from pf2lora_ray.tasks.text import truncation_line

    check_names(cfg)
    key = _data_key(cfg)
    if _checked is not None and key in _checked:
        return _checked[key]
    # Building the task checks data.task, data.path, model.name.
    task = task_for(cfg)
    report = task.check_data() or {}
    # The task keeps the partition the check drew: this does not draw it again.
    check = DataCheck(report, task.client_rows(range(cfg.fed.num_clients)))
    line = truncation_line(report, cfg.data.max_length)
    if line:
        print(f"data: {line}", file=sys.stderr)
    if _checked is not None:
        _checked[key] = check
    return check


def validate_job(
    data: dict[str, Any], sets: Sequence[str] = (), extra: dict[str, Any] | None = None
) -> list[CheckedRun]:
    """Build and check every run of a job file (its ``sweep:`` variants and ``seeds:``).

    Errors of a variant name it: ``sweep variant 'homlora': algorithm.name: ...``.

    Returns:
        (variant, config, data check) per run, in job order.
    """
    runs: list[CheckedRun] = []
    checked: dict[str, DataCheck] = {}
    for variant in expand_job(data):
        try:
            cfg = build_config(variant.overrides, sets, extra)
            if variant.seed is not None and cfg.seed != variant.seed:
                raise ConfigError(
                    f"seed: the job lists seeds: (this run has seed {variant.seed}); "
                    "drop --set seed=... or the seeds: list"
                )
            check = validate_run(cfg, checked)
        except bad_input_errors() as err:
            if not variant.folder:
                raise
            raise type(err)(f"sweep variant {variant.folder!r}: {err}") from err
        runs.append(CheckedRun(variant, cfg, check))
    return runs


# Ray re-raises an actor's exception as RayTaskError (with .cause) or, when the
# actor's constructor raised, as ActorDiedError whose only record of the cause is
# its message, which ends with the remote traceback's last line
# "<module>.<ErrorName>: <message>".
_REMOTE = re.compile(
    r"^(?:[\w.]+\.)?"
    r"(ConfigError|DataError|PartitionError|CheckpointError|UsageError|StorageError): (.+)$",
    re.MULTILINE,
)


def unwrap(err: BaseException) -> BaseException | None:
    """The project's bad-input error behind ``err`` (itself, a cause, or Ray's wrapper)."""
    bad = bad_input_errors()
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, bad) and not isinstance(cause, BaseException):
            return e
        todo += [e.__context__, e.__cause__, cause if isinstance(cause, BaseException) else None]
    found = _REMOTE.findall(str(err))
    if found:
        name, message = found[-1]
        return next(t for t in bad if t.__name__ == name)(message)
    return None


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (newlines and the indentation after them folded)."""
    return re.sub(r"\s*\n\s*", " ", str(err)).strip()
