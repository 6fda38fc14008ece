"""The issue-13 study jobs: every (task, method) config builds, the spaces are valid, the
driver composes the seed job from tuned configs and prints the exact commands.

Nothing here trains MiniLM; configs are only built and validated.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.methods import method_label
from pf2lora_ray.config import build_config, expand_job, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDY = REPO_ROOT / "jobs" / "study"
TASKS = ("sst2", "qnli", "cola", "rte")


def load_driver():
    spec = importlib.util.spec_from_file_location("run_study", STUDY / "run_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = load_driver()


@pytest.mark.parametrize("task", TASKS)
def test_every_method_builds_on_every_task(task: str) -> None:
    base = load_config(STUDY / f"{task}.yaml")
    clients = 4 if task == "qnli" else 8  # QNLI: 4 clients keep its study as short as SST-2's
    assert (base.data.task, base.data.partition) == (task, "label_sort")
    assert base.fed.num_clients == clients
    assert base.model.name == "minilm"
    assert Path(base.data.path).is_relative_to("../shared/data/glue")
    assert base.data.split == ("dev" if task == "qnli" else "train")
    data = yaml.safe_load((STUDY / f"{task}.yaml").read_text())
    for profile in driver.PROFILES:
        sets = driver.set_args(driver.profile_sets(profile, task))[1::2]
        for method, spec in driver.METHODS.items():
            keys = driver.set_args(spec["keys"])[1::2]
            cfg = build_config(data, [*keys, *sets], {})
            assert cfg.algorithm.name == spec["keys"]["algorithm.name"], method


def test_paper_profile_is_the_papers_setting() -> None:
    sets = driver.profile_sets("paper", "sst2")
    assert sets["model.name"] == "roberta-base"
    assert (sets["fed.rounds"], sets["fed.local_steps"], sets["fed.num_clients"]) == (100, 10, 8)
    assert driver.profile_sets("paper", "cola")["fed.rounds"] == 50
    assert "--set data.path=null" in " ".join(driver.set_args({"data.path": None}))


@pytest.mark.parametrize("method", list(driver.METHODS))
def test_spaces_search_every_method_with_valid_keys(method: str) -> None:
    from pf2lora_ray.tune import load_space

    space = driver.task_space("cola", method)
    assert (space["metric"], space["mode"]) == ("val.mcc.mean", "max")  # never the test split
    assert space["scheduler"] == "none"  # every trial runs to the end
    assert "algorithm.lr" in space["space"]
    path = STUDY.parent / "spaces" / f"{driver.METHODS[method]['space']}.yaml"
    base = load_config(STUDY / "sst2.yaml")
    load_space(path, base)  # raises ConfigError on an unknown key or impossible value


def test_compose_gives_each_method_its_tuned_rates_on_every_seed() -> None:
    base = yaml.safe_load((STUDY / "sst2.yaml").read_text())
    tuned = {
        "homlora": {**base, "algorithm": {"name": "homlora", "lr": 0.002}},
        "pf2lora_first_order": {
            **base,
            "algorithm": {"name": "pf2lora", "lr": 0.004},
            "pf2lora": {"hypergrad": "first_order", "lr_lower": 0.5},
        },
    }
    job = driver.compose(base, tuned, [0, 1, 2])
    assert job["seeds"] == [0, 1, 2]
    assert job["sweep"][0] == {
        "label": "homlora",
        "algorithm.name": "homlora",
        "algorithm.lr": 0.002,
    }
    runs = expand_job(job)
    assert [run.folder for run in runs] == [
        "homlora-s0",
        "homlora-s1",
        "homlora-s2",
        "pf2lora_first_order-s0",
        "pf2lora_first_order-s1",
        "pf2lora_first_order-s2",
    ]
    built = [build_config(run.overrides, [], {}) for run in runs]
    assert [cfg.seed for cfg in built] == [0, 1, 2, 0, 1, 2]
    first_order = built[4]
    assert (first_order.pf2lora.hypergrad, first_order.pf2lora.lr_lower) == ("first_order", 0.5)
    assert first_order.algorithm.lr == 0.004
    assert {method_label(run.folder, run.seed) for run in runs} == {
        "homlora",
        "pf2lora_first_order",
    }
    assert {run.label for run in runs} == {"homlora", "pf2lora_first_order"}


def test_dry_run_prints_tune_run_report(tmp_path: Path) -> None:
    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, str(STUDY / "run_study.py"), "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    tunes = len(driver.DEFAULT_METHODS)
    assert len(commands) == 2 * (tunes + 1) + 1  # per task a tune per method and a run; report
    for start, task in ((0, "sst2"), (tunes + 1, "qnli")):
        tuned = commands[start : start + tunes]
        assert all(" tune " in line and "--samples 5 --set seed=0" in line for line in tuned)
        assert f"run {out}/jobs/{task}.yaml --out {out}/runs/{task}" in commands[start + tunes]
    assert commands[-1].endswith(f"report {out}")
    # Seed 0 is each method's chosen trial: the seed job runs the other seeds.
    assert f"# seed 0 of sst2/homlora: the chosen trial, copied to {out}/runs/sst2/homlora-s0" in (
        done.stdout
    )
    assert not out.exists()


def test_seed_job_resumes_only_once_one_of_its_runs_exists(tmp_path: Path, monkeypatch) -> None:
    """The copied seed-0 runs are not the seed job's: `pf2lora run --resume` would refuse."""
    study = driver.Study(driver.parse_args(["--out", str(tmp_path)]))
    seen: list[list[str]] = []
    monkeypatch.setattr(study, "command", lambda argv, *_: seen.append(argv))
    runs = tmp_path / "runs" / "sst2"
    for name in ("homlora-s0", "pf2lora-s0"):
        (runs / name).mkdir(parents=True)
        (runs / name / "runs.parquet").write_bytes(b"")
    study.run("sst2", tmp_path / "jobs" / "sst2.yaml")
    (runs / "homlora-s1").mkdir()
    (runs / "homlora-s1" / "runs.parquet").write_bytes(b"")
    study.run("sst2", tmp_path / "jobs" / "sst2.yaml")
    assert ["--resume" in argv for argv in seen] == [False, True]


def test_replay_first_round_gives_the_runs_own_round_one(tmp_path: Path) -> None:
    """jobs/study/replay_first_round.py (REPRODUCTION, the diverged personal adapter)."""
    import pandas as pd

    from pf2lora_ray.cli import main
    from tests.helpers import synthetic_run_args

    out = tmp_path / "run"
    sets = ("runtime.backend=local", "fed.rounds=1", "fed.eval_every=1", "synthetic.train_size=64")
    assert main(synthetic_run_args(out, *sets)) == 0
    done = subprocess.run(
        [sys.executable, str(STUDY / "replay_first_round.py"), str(out), "2", "7"],
        capture_output=True,
        text=True,
        check=True,
    )
    metrics = pd.read_parquet(out / "metrics.parquet")
    loss = metrics[(metrics["split"] == "train") & (metrics["metric"] == "train_loss")]
    loss = loss.set_index("client_id")["value"]
    lines = [line for line in done.stdout.splitlines() if line.startswith("client ")]
    assert [line.split(":")[0] for line in lines] == ["client 2", "client 7"]
    for k, line in zip((2, 7), lines, strict=True):
        assert f"round-1 train_loss {loss[k]:.4f}," in line  # the run's own round 1
        norm = float(line.split("||D|| ")[1].split(";")[0])
        assert norm > 0  # D_k starts at 0: one round of the lower level moved it
