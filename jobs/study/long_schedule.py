"""Issue 19, item 4: PF2LoRA at a small beta on a long schedule, beside HOMLoRA.

    python jobs/study/long_schedule.py --study OUT [--out OUT/long] [--dry-run]

The only setting where PF2LoRA's personal level helped on SST-2 (beta = 0.1 at
8 x 4 steps, issue 13) was never run longer. This job runs it on SST-2, seed 0,
for 24 rounds x 8 local steps, evaluating every 8 rounds, beside HOMLoRA on the
same schedule, with rates chosen on validation by the SST-2 study's searches:

- HOMLoRA: the lr of its chosen trial (``OUT/tune/sst2/homlora/best.yaml``);
- PF2LoRA: among the study's PF2LoRA trials with beta (``pf2lora.lr_lower``) <= 0.1,
  the one with the best validation accuracy: its lr and beta. No trial looks at test.

Both run on 4 clients (the study's SST-2 job with ``fed.num_clients=4``) so the two
long runs fit beside the study on 2 cores. Every evaluation writes test and val
rows with and without the personal level (``accuracy.shared_only``), so the report
of ``--out`` shows PF2LoRA against HOMLoRA at rounds 8, 16 and 24.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

JOBS = Path(__file__).resolve().parent
SMALL_BETA = 0.1
SCHEDULE = {
    "fed.num_clients": 4,
    "fed.clients_per_round": 4,
    "fed.rounds": 24,
    "fed.local_steps": 8,
    "fed.eval_every": 8,
    "seed": 0,
}


def small_beta_trial(trials: pd.DataFrame, metric: str = "val.accuracy.mean") -> pd.Series:
    """The best trial by ``metric`` at its last round among those with beta <= SMALL_BETA.

    Raises:
        SystemExit: no trial of the search tried a beta that small.
    """
    last = trials.sort_values("round").groupby("trial_id").tail(1)
    small = last[last["config/pf2lora.lr_lower"] <= SMALL_BETA]
    if small.empty:
        raise SystemExit(
            f"no PF2LoRA trial tried beta <= {SMALL_BETA}; betas tried: "
            f"{sorted(last['config/pf2lora.lr_lower'].round(4))}"
        )
    return small.loc[small[metric].idxmax()]


def compose(study: Path) -> dict:
    """The long-schedule job (a sweep of two variants) from the study's searches."""
    base = yaml.safe_load((JOBS / "sst2.yaml").read_text())
    homlora = yaml.safe_load((study / "tune" / "sst2" / "homlora" / "best.yaml").read_text())
    trials = pd.read_parquet(study / "tune" / "sst2" / "pf2lora" / "trials.parquet")
    trial = small_beta_trial(trials)
    variants = [
        {
            "label": "homlora",
            "algorithm.name": "homlora",
            "algorithm.lr": homlora["algorithm"]["lr"],
        },
        {
            "label": "pf2lora_small_beta",
            "algorithm.name": "pf2lora",
            "pf2lora.hypergrad": "unrolled",
            "algorithm.lr": float(trial["config/algorithm.lr"]),
            "pf2lora.lr_lower": float(trial["config/pf2lora.lr_lower"]),
        },
    ]
    job = {key: value for key, value in base.items() if key != "seed"}
    for dotted, value in SCHEDULE.items():
        section, _, key = dotted.partition(".")
        if key:
            job.setdefault(section, {})[key] = value
        else:
            job[section] = value
    return {**job, "sweep": variants}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="the SST-2 study's OUT folder")
    parser.add_argument("--out", help="default: STUDY/long")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    study = Path(args.study)
    out = Path(args.out) if args.out else study / "long"
    job = compose(study)
    path = study / "jobs" / "long_sst2.yaml"
    print(yaml.safe_dump(job["sweep"], sort_keys=False), end="")
    if args.dry_run:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    pf2lora = [sys.executable, "-m", "pf2lora_ray.cli"]
    resume = ["--resume"] if out.exists() else []
    subprocess.run([*pf2lora, "run", str(path), "--out", str(out), *resume], check=True)
    subprocess.run([*pf2lora, "report", str(out)], check=True)


if __name__ == "__main__":
    main()
