"""Exports of generation runs: predict wraps a source (text or triples) as evaluation did."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from test_export import make_run

from pf2lora_ray.cli import main
from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import load_config
from pf2lora_ray.export import export_peft, predict_many
from pf2lora_ray.export.writer import client_params, load_run
from pf2lora_ray.tasks.webnlg import linearise

CLIENT = 1
TRIPLES = [("Town_1", "mayor", "Jo"), ("Town_1", "country", '"Spain"')]


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_pairs(path: Path, rows: int = 16) -> Path:
    """A text2text CSV: sources ``town i`` -> ``The mayor of Town i is Jo.``"""
    pd.DataFrame(
        {"src": [f"town {i}" for i in range(rows)],
         "tgt": [f"The mayor of Town {i} is Jo." for i in range(rows)]}
    ).to_csv(path, index=False)
    return path


def write_webnlg(folder: Path, entries: int = 12) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    items = [
        {str(i + 1): {"category": "Town",
                      "modifiedtripleset": [{"subject": f"Town_{i}", "property": "mayor",
                                             "object": "Jo"}],
                      "lexicalisations": [{"lex": f"The mayor of Town {i} is Jo."}]}}
        for i in range(entries)
    ]
    (folder / "train.json").write_text(json.dumps({"entries": items}))
    return folder


def trained_run(tmp: Path, data: list[str], extra: dict | None = None) -> Path:
    """A run folder whose checkpoint holds random non-zero adapters (a random model writes
    text rather than stopping at once, so comparing decoded texts means something)."""
    cfg = load_config(None, [
        "model.name=tiny-gpt2", *data, "data.max_new_tokens=8", "data.num_beams=2",
        "data.max_length=64", "fed.num_clients=2", "fed.clients_per_round=2", "fed.rounds=1",
        "adapter.r=4", "adapter.r_personal=2", "runtime.backend=local", "runtime.quiet=true",
    ], extra)
    make_run(tmp / "run", cfg)
    return tmp / "run"


def evaluation_decoding(run: Path, sources: list[str]) -> list[str]:
    """What the run's evaluation would decode for ``sources`` with client CLIENT's model."""
    cfg, round_, theta, personal = load_run(run)
    host = ClientHost(cfg, [CLIENT])
    params = client_params(host, round_, theta, personal, CLIENT)
    prompts = [host.task.prompt_ids(s) for s in sources]
    return host.task.generate(host.model, params, prompts)


def test_webnlg_export_predicts_from_triples_what_evaluation_decodes(tmp_path, capsys):
    run = trained_run(tmp_path, ["data.name=webnlg", f"data.path={write_webnlg(tmp_path / 'd')}"])
    out = export_peft(run, CLIENT, tmp_path / "out")
    expected = evaluation_decoding(run, [linearise(TRIPLES), "Town 3 : mayor : Jo"])
    assert predict_many(out, [linearise(TRIPLES), "Town 3 : mayor : Jo"]) == expected
    argv = ["predict", str(out)]
    for s, p, o in TRIPLES:
        argv += ["--triple", s, p, o]
    assert main(argv) == 0
    # (split on "\n" only: random bytes may hold other line breaks of str.splitlines)
    assert capsys.readouterr().out.rstrip("\n").split("\n") == [expected[0]]
    assert any(expected)  # the trained model writes something: the comparison can fail


def test_text2text_export_predicts_from_text_and_refuses_triples(tmp_path, capsys):
    data = ["data.name=text2text", f"data.path={write_pairs(tmp_path / 'p.csv')}",
            "data.source_column=src", "data.target_column=tgt"]
    run = trained_run(tmp_path, data, {"data.prompt": "In: {source}\nOut:"})
    out = export_peft(run, CLIENT, tmp_path / "out")
    assert main(["predict", str(out), "--text", "town 5"]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n") == evaluation_decoding(
        run, ["town 5"]
    )
    assert main(["predict", str(out), "--triple", "a", "b", "c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give it with --text" in err[0]
    assert main(["predict", str(out)]) == 2
    assert "--text" in capsys.readouterr().err
