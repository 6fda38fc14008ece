#!/usr/bin/env bash
# The issue-13 study (jobs/study/README.md): tune every method on seed 0 with the same
# number of trials, run the best rates on seeds 0 1 2, report with 95% t-intervals.
#   jobs/study.sh                                   # default: SST-2, sized for 2 CPU cores, < 2 h
#   jobs/study.sh --tasks sst2 qnli                 # + QNLI (about 4x SST-2's cost)
#   jobs/study.sh --tasks sst2 qnli cola rte        # + the switched tasks
#   jobs/study.sh --profile paper --tasks sst2 qnli cola --out results/study-paper   # GPU cluster
#   jobs/study.sh --dry-run                         # print the exact commands only
# Run from the repository root; every option is in jobs/study/run_study.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python jobs/study/run_study.py "$@"
