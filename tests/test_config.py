"""Config: YAML overrides, typed --set, and errors that name the key (exit status 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pf2lora_ray.cli import main
from pf2lora_ray.config import ConfigError, config_hash, load_config


def test_yaml_overrides_and_sets_compose():
    cfg = load_config("jobs/synthetic_rank.yaml", ["fed.rounds=3", "adapter.targets=proj"])
    assert cfg.fed.rounds == 3 and cfg.adapter.r == 4 and cfg.adapter.targets == ("proj",)
    assert cfg.pf2lora.hypergrad == "unrolled"  # default kept


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("fed.rounds=0", "fed.rounds"),
        ("adapter.r=0", "adapter.r"),
        ("algorithm.lr=-1", "algorithm.lr"),
        ("pf2lora.lr_lower=-0.1", "pf2lora.lr_lower"),
        ("fed.clients_per_round=11", "fed.clients_per_round"),
        ("algorithm.name=", "algorithm.name"),  # registry names: tests/test_validate.py
        ("pf2lora.hypergrad=second", "pf2lora.hypergrad"),
        ("fed.rounds=three", "fed.rounds"),
        ("fed.rounds=2.5", "fed.rounds"),
        ("runtime.dashboard=3", "runtime.dashboard"),
        ("fed.bogus=1", "fed.bogus"),
        ("nosection.key=1", "nosection"),
    ],
)
def test_bad_values_name_the_key(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("jobs/synthetic_rank.yaml", [item])


def test_restart_timeout_is_a_positive_fault_setting_outside_the_hash():
    base = load_config("jobs/synthetic_rank.yaml")
    slow = load_config("jobs/synthetic_rank.yaml", ["faults.restart_timeout_s=600"])
    assert base.faults.restart_timeout_s == 120.0 and slow.faults.restart_timeout_s == 600.0
    assert config_hash(slow) == config_hash(base)  # a resumed run may wait longer
    with pytest.raises(ConfigError, match=r"faults\.restart_timeout_s.*must be > 0"):
        load_config("jobs/synthetic_rank.yaml", ["faults.restart_timeout_s=0"])


def test_config_hash_ignores_runtime_but_not_model_settings():
    a = load_config("jobs/synthetic_rank.yaml")
    assert config_hash(a) == config_hash(
        load_config("jobs/synthetic_rank.yaml", ["runtime.backend=local"])
    )
    assert config_hash(a) != config_hash(load_config("jobs/synthetic_rank.yaml", ["adapter.r=3"]))


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("fed: {rounds: 0}\n", "fed.rounds"),
        ("- a\n- b\n", "mapping"),
        ("fed: [1, 2\n", "malformed YAML"),
        ("adapter:\n  rank: 4\n", "adapter.rank"),
    ],
)
def test_cli_bad_config_exits_2_without_writing(tmp_path, capsys, yaml_text, needle):
    job = tmp_path / "job.yaml"
    job.write_text(yaml_text)
    out = tmp_path / "out"
    assert main(["run", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_cli_bad_set_exits_2_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pf2lora_ray.cli",
            "run",
            "jobs/synthetic_rank.yaml",
            "--set",
            "adapter.r=-2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "adapter.r" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_load_config_refuses_a_job_of_several_runs(tmp_path):
    for key, value in (("sweep", {"fed.rounds": [1, 2]}), ("seeds", [0, 1])):
        job = tmp_path / f"{key}.yaml"
        job.write_text(f"{key}: {value}\n")
        with pytest.raises(ConfigError, match=f"{key}: this job is several runs"):
            load_config(job)


def test_sweep_mapping_is_a_product_and_labels_name_variants():
    from pf2lora_ray.config import expand_job

    runs = expand_job({"fed": {"rounds": 2}, "sweep": {"algorithm.name": ["a", "b"],
                                                        "adapter.r": [1, 2]}})
    assert [v.folder for v in runs] == ["a-1", "a-2", "b-1", "b-2"]
    assert runs[3].overrides == {"fed": {"rounds": 2}, "algorithm": {"name": "b"},
                                 "adapter": {"r": 2}}
    with pytest.raises(ConfigError, match="labels must be unique"):
        expand_job({"sweep": [{"label": "x"}, {"label": "x"}]})


def test_runtime_placement_is_a_config_key():
    from pf2lora_ray.config import ConfigError

    assert load_config("jobs/synthetic_rank.yaml").runtime.placement == "balanced"
    cfg = load_config("jobs/synthetic_rank.yaml", ["runtime.placement=static"])
    assert cfg.runtime.placement == "static"
    with pytest.raises(ConfigError, match="runtime.placement"):
        load_config("jobs/synthetic_rank.yaml", ["runtime.placement=random"])
