"""PEFT export: a client's exported adapter reproduces the simulation's outputs exactly.

Transformer cases build a run folder whose checkpoint holds random, clearly
nonzero B, D and head (so the comparison is meaningful), export one client and
compare PeftModel outputs with ``functional_call`` of the two-level model on
{**theta, **phi_k}. Synthetic cases export real (short) runs of algorithms that
keep LoRA factors personal or truncate them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_synthetic
from torch.func import functional_call

from pf2lora_ray.algorithms import ALGORITHMS
from pf2lora_ray.algorithms.hetlora import RANK, STATE, truncate
from pf2lora_ray.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pf2lora_ray.cli import main
from pf2lora_ray.client import ClientHost, build_adapted_model
from pf2lora_ray.config import Config, load_config, to_dict
from pf2lora_ray.experiment import UsageError, run_experiment
from pf2lora_ray.export import export_peft, load_export, predict
from pf2lora_ray.tasks import task_for

CLIENT = 1
TEXTS = ["good fun great", "awful dull boring film", "a gorgeous film", "fine"]
WORDS = ["good", "bad", "great", "awful", "fine", "dull", "fun", "boring", "film"]


def write_sst2_csv(path: Path, rows: int = 40) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["sentence", "label"])
        for i in range(rows):
            out.writerow([" ".join(rng.choice(WORDS, 4)), i % 2])
    return path


def write_webnlg(folder: Path, entries: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = [
        {
            str(i + 1): {
                "category": "Airport",
                "modifiedtripleset": [
                    {"subject": f"Town_{i}", "property": "mayor", "object": "Jo"}
                ],
                "lexicalisations": [{"lex": f"The mayor of Town {i} is Jo."}],
            }
        }
        for i in range(entries)
    ]
    (folder / "train.json").write_text(json.dumps({"entries": items}))
    return folder


def tiny_cfg(tmp: Path, model: str, data: str, algorithm: str = "pf2lora") -> Config:
    sources = {
        "glue": ["data.name=csv", "data.task=sst2", f"data.path={write_sst2_csv(tmp / 'd.csv')}"],
        "webnlg": ["data.name=webnlg", f"data.path={write_webnlg(tmp / 'webnlg')}"],
    }
    return load_config(
        None,
        [
            f"model.name={model}",
            *sources[data],
            f"algorithm.name={algorithm}",
            "fed.num_clients=2",
            "fed.clients_per_round=2",
            "fed.rounds=1",
            "adapter.r=4",
            "adapter.r_personal=2",
            "adapter.alpha=8",
            "runtime.backend=local",
            "runtime.quiet=true",
        ],
    )


def make_run(run_dir: Path, cfg: Config) -> None:
    """A run folder (config.yaml + round-1 checkpoint) with random nonzero trained state."""
    host = ClientHost(cfg, range(cfg.fed.num_clients))
    rng = np.random.default_rng(7)

    def perturb(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: (v + rng.normal(0, 0.5, v.shape)).astype(v.dtype) if v.dtype == np.float32 else v
            for k, v in arrays.items()
        }

    personal = {k: perturb(v) for k, v in host.get_personal().items()}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_checkpoint(run_dir, cfg, 1, perturb(host.initial_shared()), personal)


def simulation_model(cfg: Config) -> torch.nn.Module:
    return build_adapted_model(cfg, task_for(cfg), ALGORITHMS[cfg.algorithm.name](cfg))


def checkpoint_params(run_dir: Path, cfg: Config, client: int | None) -> dict[str, torch.Tensor]:
    """theta, plus client's phi unless ``client`` is None."""
    _, theta, personal = load_checkpoint(run_dir, cfg)
    phi = personal.get(client, {}) if client is not None else {}
    return {k: torch.from_numpy(v) for k, v in {**theta, **phi}.items()}


@pytest.mark.parametrize(
    ("model", "data", "algorithm"),
    [
        ("tiny-bert", "glue", "pf2lora"),  # Linear query/value, classifier head shared
        ("tiny-bert", "glue", "local_lora"),  # A, B and classifier all personal
        ("tiny-gpt2", "glue", "pf2lora"),  # Conv1D c_attn (fan_in_fan_out), score head
        ("tiny-gpt2", "webnlg", "pf2lora"),  # causal LM, no head
    ],
)
def test_export_reproduces_simulation_outputs(
    tmp_path: Path, model: str, data: str, algorithm: str
) -> None:
    cfg = tiny_cfg(tmp_path, model, data, algorithm)
    make_run(tmp_path / "run", cfg)
    out = export_peft(tmp_path / "run", CLIENT, tmp_path / "out")

    peft_model, tokenizer, info = load_export(out)
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    sim = simulation_model(cfg)
    params = checkpoint_params(tmp_path / "run", cfg, CLIENT)
    with torch.no_grad():
        expected = functional_call(sim, params, (), inputs, strict=False).logits
        got = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            base = peft_model(**inputs).logits
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-5
    assert (base - expected).abs().max() > 1e-2  # the adapter changes the model
    r_total = ALGORITHMS[algorithm](cfg).ranks()
    assert info["rank"] == peft_model.peft_config["default"].r == sum(r_total)
    assert info["task_type"] == ("CAUSAL_LM" if data == "webnlg" else "SEQ_CLS")
    assert info["client"] == CLIENT and info["round"] == 1
    if data == "glue":
        assert info["labels"] == ["negative", "positive"]
        assert predict(out, TEXTS[0]).split()[0] in info["labels"]


def test_personal_level_matters_and_shared_only_drops_it(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "tiny-bert", "glue")
    make_run(tmp_path / "run", cfg)
    export_peft(tmp_path / "run", CLIENT, tmp_path / "shared", shared_only=True)
    peft_model, tokenizer, info = load_export(tmp_path / "shared")
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    sim = simulation_model(cfg)
    with torch.no_grad():
        glob = functional_call(sim, checkpoint_params(tmp_path / "run", cfg, None), (), inputs)
        personal = functional_call(
            sim, checkpoint_params(tmp_path / "run", cfg, CLIENT), (), inputs
        )
        got = peft_model(**inputs).logits
    assert (got - glob.logits).abs().max() < 1e-5
    assert (personal.logits - glob.logits).abs().max() > 1e-2  # C, D really were dropped
    assert info["rank"] == cfg.adapter.r and info["shared_only"] and info["client"] is None


def _synthetic_reference(algorithm: str, phi: dict, theta: dict) -> dict[str, torch.Tensor]:
    params = {k: torch.from_numpy(v) for k, v in {**theta, **phi}.items()}
    if algorithm == "hetlora":  # evaluated with theta truncated to the client's rank
        rank = int(params[RANK])
        params = truncate({k: v for k, v in params.items() if k not in STATE}, rank)
    return params


@pytest.mark.parametrize("algorithm", ["pf2lora", "local_lora", "fedsa_lora", "hetlora"])
def test_export_of_real_synthetic_runs(tmp_path: Path, algorithm: str) -> None:
    from peft import PeftModel

    cfg = tiny_synthetic(
        "fed.rounds=2", f"algorithm.name={algorithm}", "hetlora.r_min=1", "hetlora.r_max=3"
    )
    run_experiment(cfg, tmp_path / "run")
    out = export_peft(tmp_path / "run", CLIENT, tmp_path / "out")
    _, theta, personal = load_checkpoint(tmp_path / "run", cfg)
    params = _synthetic_reference(algorithm, personal.get(CLIENT, {}), theta)

    task = task_for(cfg)
    torch.manual_seed(cfg.seed)
    peft_model = PeftModel.from_pretrained(task.build_model(), str(out)).eval()
    x = torch.randn(8, cfg.synthetic.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = functional_call(simulation_model(cfg), params, (x,), strict=False)
        got = peft_model(x)
        with peft_model.disable_adapter():
            base = peft_model(x)
    assert (got - expected).abs().max() < 1e-5
    assert (got - base).abs().max() > 1e-3
    with pytest.raises(UsageError, match="not a transformers text model"):
        predict(out, "hello")


def test_cli_export_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_cfg(tmp_path, "tiny-bert", "glue")
    make_run(tmp_path / "run", cfg)
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), "--client", "0", "--to", str(out)]) == 0
    assert main(["predict", str(out), "--text", "a gorgeous film", "--text", "dull"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert all(line.split()[0] in ("negative", "positive") for line in lines)
    assert (out / "tokenizer.json").is_file() and (out / "base_model" / "config.json").is_file()
    # Refuses to write over an existing export.
    assert main(["export", str(tmp_path / "run"), "--client", "0", "--to", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_synthetic("fed.rounds=1", "algorithm.name=local_lora")
    run_experiment(cfg, tmp_path / "run")

    with pytest.raises(UsageError, match=r"--client 10: the run has clients 0\.\.9"):
        export_peft(tmp_path / "run", 10, tmp_path / "a")
    with pytest.raises(UsageError, match="keeps .*lora_A.* personal"):
        export_peft(tmp_path / "run", 0, tmp_path / "b", shared_only=True)
    with pytest.raises(UsageError, match="not a run folder"):
        export_peft(tmp_path, 0, tmp_path / "c")
    with pytest.raises(UsageError, match="not a pf2lora export"):
        predict(tmp_path, "text")

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="no checkpoint"):
        export_peft(no_ckpt, 0, tmp_path / "d")
    assert main(["export", str(no_ckpt), "--client", "0", "--to", str(tmp_path / "d")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
