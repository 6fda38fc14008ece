"""WebNLG: reading the JSON layout, target-only loss, functional generation, a tiny run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pf2lora_ray.config import ConfigError, load_config
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.tasks.base import DataError
from pf2lora_ray.tasks.webnlg import WebNLGTask, linearise, read_entries


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run many small ops; with 2 threads on a shared 2-core machine the
    thread hand-offs cost more than the ops (measured ~20x slower), so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PF2LORA_DATA", REPO.parent / "shared" / "data"))
WEBNLG = DATA / "webnlg2017"

CATEGORIES = ["Airport", "Food", "City"]


def write_webnlg(folder: Path, per_category: int = 6) -> Path:
    """A WebNLG-layout train.json: each entry one triple, two lexicalisations."""
    entries = []
    for c, category in enumerate(CATEGORIES):
        for i in range(per_category):
            subject, obj = f"{category}_{i}", f'"{c}{i}"'
            triple = {"subject": subject, "property": "code", "object": obj}
            lexes = [f"{category} {i} has code {c}{i}.", f"The code of {category} {i} is {c}{i}."]
            entries.append(
                {
                    str(len(entries) + 1): {
                        "category": category,
                        "modifiedtripleset": [triple],
                        "lexicalisations": [
                            {"lex": t, "comment": "good", "lang": ""} for t in lexes
                        ],
                    }
                }
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps({"entries": entries}))
    return folder


def cfg_for(folder: Path, **extra):
    base = {
        "model.name": "tiny-gpt2",
        "data.name": "webnlg",
        "data.path": str(folder),
        "data.partition": "task",
        "data.max_length": 96,
        "data.max_new_tokens": 12,
        "data.batch_size": 8,
        "fed.num_clients": 3,
        "fed.clients_per_round": 3,
        "runtime.backend": "local",
        "runtime.quiet": True,
    }
    return load_config(None, extra={**base, **extra})


@pytest.mark.skipif(not (WEBNLG / "dev.json").is_file(), reason=f"no WebNLG data under {WEBNLG}")
def test_reads_the_shared_webnlg_dev_split():
    entries = read_entries(WEBNLG / "dev.json")
    assert len(entries) == 872
    assert sum(len(e.references) for e in entries) == 2268
    assert len({e.group for e in entries}) == 10


def test_linearised_triples_read_as_words():
    assert (
        linearise([("Aarhus_Airport", "cityServed", '"Aarhus, Denmark"'), ("A", "b", "C_D")])
        == "Aarhus Airport : cityServed : Aarhus, Denmark | A : b : C D"
    )


def test_task_partition_gives_each_client_one_category_and_test_references(tmp_path):
    task = WebNLGTask(cfg_for(write_webnlg(tmp_path)))
    data = task.client_data([0, 1, 2])
    tok = task.tokenizer
    for k, d in data.items():
        prompts = {tok.decode(p) for p in d.test.extra["prompt"]}
        assert all(CATEGORIES[k] in p for p in prompts)
        assert all(len(refs) == 2 for refs in d.test.extra["references"])
        # every lexicalisation of a train entry is a training example
        assert len(d.train) % 2 == 0 and len(d.train) > 0


def test_loss_counts_only_target_tokens(tmp_path):
    task = WebNLGTask(cfg_for(write_webnlg(tmp_path)))
    torch.manual_seed(0)
    model = task.build_model()
    split = task.client_data([0])[0].train
    batch = task.batch(split, np.arange(3))
    row = split.rows[0]
    prompt_len = sum(1 for y in row["labels"] if y == -100)
    assert row["input_ids"][prompt_len:] == row["labels"][prompt_len:]
    assert row["labels"][-1] == task.tokenizer.eos_token_id
    params = dict(model.named_parameters())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    manual = F.cross_entropy(logits[:, :-1][mask], labels[mask])
    assert torch.allclose(task.loss(model, params, batch), manual, atol=1e-6)


def test_generation_uses_the_substituted_parameters_and_leaves_the_model_alone(tmp_path):
    task = WebNLGTask(cfg_for(write_webnlg(tmp_path), **{"data.max_new_tokens": 6}))
    torch.manual_seed(0)
    model = task.build_model()
    prompt = task.client_data([0])[0].test.extra["prompt"][:2]
    name = "transformer.h.0.attn.c_attn.weight"
    before = model.get_submodule("transformer.h.0.attn.c_attn").weight.detach().clone()
    params = {name: torch.randn_like(before)}

    # Reference: greedy decoding step by step through functional_call(forward).
    expected = []
    for p in prompt:
        ids = list(p)
        for _ in range(6):
            logits = functional_call(model, params, (torch.tensor([ids]),)).logits
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == task.tokenizer.eos_token_id:
                break
        expected.append(task.tokenizer.decode(ids[len(p) :], skip_special_tokens=True).strip())

    assert task.generate(model, params, prompt) == expected
    assert torch.equal(model.get_submodule("transformer.h.0.attn.c_attn").weight, before)
    assert task.generate(model, {}, prompt) != expected


def test_missing_path_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="data.path: webnlg reads local files"):
        WebNLGTask(load_config(None, extra={"model.name": "tiny-gpt2", "data.name": "webnlg"}))
    (tmp_path / "train.json").write_text(json.dumps({"entries": [{"1": {"category": "A"}}]}))
    with pytest.raises(DataError, match="entry 0 lacks"):
        WebNLGTask(cfg_for(tmp_path)).entries()


def test_tiny_gpt2_generation_run_reports_bleu_and_rouge(tmp_path):
    cfg = cfg_for(
        write_webnlg(tmp_path / "data"),
        **{"fed.rounds": 2, "fed.local_steps": 3, "fed.eval_every": 1, "algorithm.lr": 0.01},
    )
    run_experiment(cfg, tmp_path / "out")
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    test = df[df.client_id.notna() & (df.split == "test")]
    # The task reports these; an algorithm may add its own diagnostics beside them.
    assert {"bleu", "chrf", "ter", "loss", "rouge_l"} <= set(test.metric)
    assert sorted(test.client_id.unique()) == [0, 1, 2]
    assert test[test.metric == "bleu"].value.between(0, 100).all()
    assert test[test.metric == "rouge_l"].value.between(0, 1).all()
    loss = df[df.metric == "train_loss.mean"].sort_values("round").value.to_numpy()
    assert loss[-1] < loss[0]


@pytest.mark.ray
def test_tiny_generation_on_ray_matches_local(tmp_path):
    folder = write_webnlg(tmp_path / "data", per_category=4)
    extra = {"fed.rounds": 1, "fed.local_steps": 2, "data.max_new_tokens": 6}
    frames = []
    for backend in ("local", "ray"):
        run_experiment(cfg_for(folder, **extra, **{"runtime.backend": backend}), tmp_path / backend)
        frames.append(pd.read_parquet(tmp_path / backend / "metrics.parquet"))
    key = ["round", "client_id", "split", "metric"]
    merged = frames[0].merge(frames[1], on=key, suffixes=("_local", "_ray"))
    assert len(merged) == len(frames[0]) > 0
    np.testing.assert_allclose(merged.value_local, merged.value_ray, rtol=1e-4, atol=1e-5)
