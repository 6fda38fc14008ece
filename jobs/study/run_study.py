"""Run the study (issues 13, 19): tune each method on seed 0, run the best on every seed, report.

    python jobs/study/run_study.py [--tasks sst2 qnli] [--methods ...] [--seeds 0 1 2]
        [--trials 5] [--max-concurrent N] [--profile default|long|paper]
        [--set KEY=VALUE ...] [--out DIR] [--dry-run]

Steps, per task (base job ``jobs/study/<task>.yaml``):

1. ``pf2lora tune`` once per method on seed 0, every method with the same number of
   trials (``--trials``, default 5) over its own rate(s) (``jobs/spaces/study_*.yaml``:
   no scheduler, every trial runs to the end, the best by its clients' mean validation
   metric at the last round; the test split is never looked at), into
   ``OUT/tune/<task>/<method>/`` (skipped when its best.yaml exists, so a rerun resumes).
2. A job ``OUT/jobs/<task>.yaml``: the base job, ``seeds: [0, 1, 2]`` and one sweep
   variant per method (label ``<method>``) holding the method's keys and tuned rates.
3. ``pf2lora run`` of that job into ``OUT/runs/<task>/<method>-s<seed>/``; seed 0's run is
   the chosen trial itself, copied (it is the same run), so only the other seeds are run.
4. ``pf2lora report OUT``: means with 95% Student-t intervals over seeds, paired
   differences PF2LoRA minus each baseline, the personal level (analysis/study.py), and
   how each method was searched (trials, rounds reached). ``pf2lora report OUT --compact
   DEST`` keeps what the tables need in a few hundred KB (analysis/compact.py).

Every command is printed before it runs (``--dry-run`` prints them only) and its wall
time is appended to ``OUT/timing.tsv``. Run from the repository root. Unless
RAY_ADDRESS is set, each tune starts its own local Ray (``RAY_ADDRESS=local``) rather
than joining one already running on the machine; ``--profile paper`` leaves it unset.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

JOBS = Path(__file__).resolve().parent
SPACES = JOBS.parent / "spaces"
# The console script next to this Python (.venv/bin/pf2lora), shown relative to the cwd.
_SCRIPT = Path(sys.executable).with_name("pf2lora")
PF2LORA = (
    [os.path.relpath(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "pf2lora_ray.cli"]
)

# The six methods of the paper's comparison (PF2LORA.md, Baselines; Table 1 plus the
# first-order ablation), and Per-FedAvg with an AdamW outer step (its paper's SGD outer
# step does not leave the initialisation in the default study's 32 steps: REPRODUCTION.md):
# the keys that make each one, and its search space.
METHODS: dict[str, dict[str, Any]] = {
    "centralized_lora": {"space": "study_lr", "keys": {"algorithm.name": "centralized_lora"}},
    "homlora": {"space": "study_lr", "keys": {"algorithm.name": "homlora"}},
    "per_fedavg": {
        "space": "study_per_fedavg",
        "keys": {"algorithm.name": "per_fedavg", "per_fedavg.variant": "first_order"},
    },
    "per_fedavg_adamw": {
        "space": "study_per_fedavg_adamw",
        "keys": {
            "algorithm.name": "per_fedavg",
            "per_fedavg.variant": "first_order",
            "per_fedavg.outer": "adamw",
        },
    },
    "hetlora": {"space": "study_lr", "keys": {"algorithm.name": "hetlora"}},
    "pf2lora": {
        "space": "study_pf2lora",
        "keys": {"algorithm.name": "pf2lora", "pf2lora.hypergrad": "unrolled"},
    },
    "pf2lora_first_order": {
        "space": "study_pf2lora",
        "keys": {"algorithm.name": "pf2lora", "pf2lora.hypergrad": "first_order"},
    },
}
# The default methods: the five the paper's comparison cannot do without (issue 19), on
# every task; Per-FedAvg (either outer step) is added with --methods where the budget allows.
DEFAULT_METHODS = ["centralized_lora", "homlora", "hetlora", "pf2lora", "pf2lora_first_order"]
# The metric Tune selects on, per task: (reported column, mode); accuracy otherwise.
# Always a validation column: the test split is kept for the tables.
TUNE_METRICS = {
    "cola": ("val.mcc.mean", "max"),
    "synthetic": ("val.mse.mean", "min"),
    "webnlg": ("val.bleu.mean", "max"),
}

# --profile: --set lines applied to every tune and run (on top of the task's job).
# long: the schedule at which the issue-13 probe saw the personal level help on SST-2.
# paper: the paper's settings on a GPU cluster (RoBERTa-base, 8 label-sorted clients,
# I = 10 local steps, 100 rounds SST-2/QNLI, 50 CoLA), data from the hub.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "long": {"fed.rounds": 30, "fed.local_steps": 8, "fed.eval_every": 5},
    "paper": {
        "model.name": "roberta-base",
        "data.path": None,
        "data.split": "train",
        "data.max_length": 128,
        "data.batch_size": 32,
        "data.eval_batch_size": 128,
        "data.max_train_per_client": 0,
        "data.max_test_per_client": 0,
        "fed.num_clients": 8,
        "fed.clients_per_round": 8,
        "fed.rounds": 100,
        "fed.local_steps": 10,
        "fed.eval_every": 10,
        "runtime.backend": "ray",
        "resources.num_cpus_per_actor": 1,
        "resources.num_gpus_per_actor": 0.25,
    },
}
PAPER_ROUNDS = {"cola": 50, "mnli": 300, "qqp": 300}
# WebNLG at the paper's scale (jobs/webnlg_paper.yaml): GPT-2 medium, 10 categories,
# beam search; the offline WebNLG file stays (the hub has no such layout).
PAPER_TASK_SETS: dict[str, dict[str, Any]] = {
    "webnlg": {
        "model.name": "gpt2-medium",
        "data.path": "../shared/data/webnlg2017",
        "data.max_length": 256,
        "data.batch_size": 8,
        "data.eval_batch_size": 32,
        "data.max_val_per_client": 0,
        "data.num_beams": 10,
        "fed.num_clients": 10,
        "fed.clients_per_round": 10,
        "fed.rounds": 30,
        "fed.local_steps": 20,
        "fed.eval_every": 30,
        "adapter.r": 4,
        "adapter.alpha": 32.0,
    },
}


def profile_sets(profile: str, task: str) -> dict[str, Any]:
    """The --set values of ``profile`` for ``task``."""
    sets = dict(PROFILES[profile])
    if profile == "paper" and task in PAPER_ROUNDS:
        sets["fed.rounds"] = PAPER_ROUNDS[task]
    if profile == "paper":
        sets.update(PAPER_TASK_SETS.get(task, {}))
    return sets


def set_args(values: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments; values are written as YAML (None -> null)."""
    args = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        args += ["--set", f"{key}={text}"]
    return args


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def task_space(task: str, method: str, max_concurrent: int = 0) -> dict[str, Any]:
    """The method's search space with the task's metric (CoLA: mcc; synthetic: mse, min).

    ``max_concurrent`` > 0 caps the trials run at once (two studies side by side on
    one machine each take one trial at a time).
    """
    space = yaml.safe_load((SPACES / f"{METHODS[method]['space']}.yaml").read_text())
    space["metric"], space["mode"] = TUNE_METRICS.get(task, ("val.accuracy.mean", "max"))
    if max_concurrent:
        space["max_concurrent"] = max_concurrent
    return space


def compose(base: dict[str, Any], tuned: dict[str, dict[str, Any]], seeds: list[int]) -> dict:
    """The seed job of one task: ``base`` plus one sweep variant per method, run on ``seeds``.

    Args:
        base: The task's job (``jobs/study/<task>.yaml``), without a sweep.
        tuned: Per method, its best.yaml from ``pf2lora tune`` (a full job).
        seeds: The seeds every method runs.

    Returns:
        ``base`` with ``seeds: <seeds>`` and ``sweep:`` listing ``{label: <method>,
        <every key where the method's best.yaml differs from base>}``; ``pf2lora run``
        writes each (method, seed) to ``OUT/<method>-s<seed>/``.
    """
    flat_base = flatten(base)
    variants = []
    for method, best in tuned.items():
        keys = {
            key: value
            for key, value in flatten(best).items()
            if key != "seed" and flat_base.get(key, object()) != value
        }
        variants.append({"label": method, **keys})
    job = {key: value for key, value in base.items() if key != "seed"}
    return {**job, "seeds": list(seeds), "sweep": variants}


class Study:
    """The commands of one study, run in order (or printed with dry_run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.timing = self.out / "timing.tsv"
        # A tune on one machine starts its own Ray instead of joining whatever Ray
        # happens to run there; on a cluster set RAY_ADDRESS (e.g. auto) yourself.
        self.env = dict(os.environ)
        if args.profile != "paper":
            self.env.setdefault("RAY_ADDRESS", "local")

    def command(self, argv: list[str], stage: str, task: str, method: str = "") -> None:
        print("+ " + shlex.join(argv), flush=True)
        if self.args.dry_run:
            return
        start = time.perf_counter()
        subprocess.run(argv, check=True, env=self.env)
        self.out.mkdir(parents=True, exist_ok=True)
        with self.timing.open("a") as file:
            file.write(f"{stage}\t{task}\t{method}\t{time.perf_counter() - start:.1f}\n")

    def extra_sets(self, task: str) -> list[str]:
        user = [arg for item in self.args.set or [] for arg in ("--set", item)]
        return set_args(profile_sets(self.args.profile, task)) + user

    def tune(self, task: str, method: str) -> Path:
        folder = self.out / "tune" / task / method
        best = folder / "best.yaml"
        if best.is_file():
            print(f"# {best} exists: tune of {task}/{method} done", flush=True)
            return best
        space = Path(os.path.relpath(SPACES / f"{METHODS[method]['space']}.yaml"))
        searched = task_space(task, method, self.args.max_concurrent)
        if searched != yaml.safe_load(space.read_text()):  # the task's metric differs
            space = self.out / "spaces" / f"{task}-{method}.yaml"
            if not self.args.dry_run:
                space.parent.mkdir(parents=True, exist_ok=True)
                space.write_text(yaml.safe_dump(searched, sort_keys=False))
        argv = [*PF2LORA, "tune", str(self.job(task)), "--space", str(space)]
        argv += ["--samples", str(self.args.trials), "--set", "seed=0"]
        argv += set_args(METHODS[method]["keys"]) + self.extra_sets(task)
        argv += ["--out", str(folder)]
        if folder.exists():
            argv.append("--resume")
        self.command(argv, "tune", task, method)
        return best

    def reuse_tuned_seed(self, task: str, bests: dict[str, Path]) -> list[int]:
        """Seed 0's run of each method is its chosen trial: copy it, return the seeds left to run.

        The chosen trial ran the seed-0 job with the chosen rates; it differs from the
        seed job's run only in its checkpoint cadence, which does not change results
        (tests/test_resume.py), so it is not run again. Its runs.parquet gets the
        method's label as ``variant``; its checkpoints are not copied.
        """
        if 0 not in self.args.seeds:
            return list(self.args.seeds)
        for method, best in bests.items():
            dest = self.out / "runs" / task / f"{method}-s0"
            print(f"# seed 0 of {task}/{method}: the chosen trial, copied to {dest}", flush=True)
            if self.args.dry_run or dest.exists():
                continue
            trial = re.search(r"trial (\S+)\.$", best.read_text(), re.MULTILINE).group(1)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            source = best.parent / "trials" / trial
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoints", "report*"))
            runs = pd.read_parquet(tmp / "runs.parquet").assign(variant=method)
            runs.to_parquet(tmp / "runs.parquet", index=False)
            os.replace(tmp, dest)
        return [seed for seed in self.args.seeds if seed != 0]

    def seeds_job(self, task: str, bests: dict[str, Path], seeds: list[int]) -> Path:
        path = self.out / "jobs" / f"{task}.yaml"
        print(f"# compose {path}: {', '.join(bests)} x seeds {seeds}", flush=True)
        if not self.args.dry_run:
            base = yaml.safe_load(self.job(task).read_text())
            tuned = {method: yaml.safe_load(best.read_text()) for method, best in bests.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            job = compose(base, tuned, seeds)
            header = f"# Composed by jobs/study/run_study.py from {self.job(task)} and\n"
            header += "".join(f"#   {best}\n" for best in bests.values())
            path.write_text(header + yaml.safe_dump(job, sort_keys=False))
        return path

    def run(self, task: str, job: Path) -> None:
        folder = self.out / "runs" / task
        argv = [*PF2LORA, "run", str(job), "--out", str(folder), *self.extra_sets(task)]
        # Resume only a seed job that has started: the folder also holds the seed-0
        # runs copied from the searches, which are not runs of this job (and
        # `pf2lora run --resume` refuses a folder that holds none of the job's runs).
        started = [p for p in folder.glob("*/runs.parquet") if not p.parent.name.endswith("-s0")]
        if started:
            argv.append("--resume")
        self.command(argv, "run", task)

    def job(self, task: str) -> Path:
        return Path(self.args.job_dir) / f"{task}.yaml"

    def main(self) -> None:
        for task in self.args.tasks:
            if not self.job(task).is_file():
                raise SystemExit(f"error: no job {self.job(task)} for task {task!r}")
        for task in self.args.tasks:
            bests = {method: self.tune(task, method) for method in self.args.methods}
            seeds = self.reuse_tuned_seed(task, bests)
            if seeds:
                self.run(task, self.seeds_job(task, bests, seeds))
        self.command([*PF2LORA, "report", str(self.out)], "report", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "qnli"], help="default: sst2 qnli")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=5, help="Tune trials per method (seed 0)")
    parser.add_argument(
        "--max-concurrent", type=int, default=0, help="trials at once per tune (0: as many as fit)"
    )
    parser.add_argument("--profile", choices=list(PROFILES), default="default")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="to every tune/run")
    parser.add_argument("--out", default="results/study")
    parser.add_argument("--job-dir", default=os.path.relpath(JOBS), help="where <task>.yaml are")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser.parse_args(argv)


if __name__ == "__main__":
    Study(parse_args()).main()
