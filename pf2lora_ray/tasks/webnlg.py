"""WebNLG 2017 data-to-text (the paper's NLG experiment) behind the Task protocol.

Each WebNLG entry is a set of DBpedia triples with one or more human
lexicalisations. A causal LM reads the linearised triples as a prompt and
writes the text; the loss counts only the target tokens (prompt labels are
-100). ``data.path`` is a folder holding ``<data.split>.json`` in the JSON
layout of microsoft/LoRA (``{"entries": [{"1": {category, modifiedtripleset,
lexicalisations, ...}}, ...]}``; see ../shared/data/README.md), read with the
standard ``json`` module because the nested layout is not a table.

Clients split *entries* (so all references of an entry stay together):
``data.partition: task`` gives each client one DBpedia category (or a share of
one), ``iid`` deals entries at random, and ``dirichlet`` / ``label_sort`` skew by
category. Each client's entries are split 80/20; every lexicalisation of a train
entry is a training example, and each test entry is scored against all its
references. ``data.max_train_per_client`` / ``data.max_test_per_client`` count
entries.

Evaluation decodes greedily (or with ``data.num_beams`` beams) for at most
``data.max_new_tokens`` tokens with Hugging Face ``generate``. ``generate`` is not
a function of explicit parameters, so it runs as the ``forward`` of a thin
wrapper module called through :func:`torch.func.functional_call`: the client's
parameters are swapped into the frozen model for exactly that call and swapped
back afterwards, leaving the shared module untouched. Metrics: ``bleu``
(sacrebleu, 0-100), ``rouge_l`` (0-1) and the teacher-forced ``loss`` on each
test entry's first reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import pf2lora_ray.tasks.lm as lm
from pf2lora_ray import metrics
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks.base import Batch, ClientData, DataError, Params, register_task
from pf2lora_ray.tasks.glue import models
from pf2lora_ray.tasks.text import ClientSplits, Examples, find_split_file, pad


@dataclass(frozen=True)
class Entry:
    """One WebNLG entry: its category, triples (subject, property, object) and texts."""

    category: str
    triples: tuple[tuple[str, str, str], ...]
    texts: tuple[str, ...]


def _clean(term: str) -> str:
    """DBpedia term -> words: ``Aarhus_Airport`` -> ``Aarhus Airport``, outer quotes dropped."""
    return term.replace("_", " ").strip().strip('"').strip()


def linearise(triples: Sequence[tuple[str, str, str]]) -> str:
    """``subject : property : object | ...`` (the usual GPT-2 WebNLG input format)."""
    return " | ".join(f"{_clean(s)} : {p} : {_clean(o)}" for s, p, o in triples)


def prompt_of(entry: Entry) -> str:
    return f"Triples: {linearise(entry.triples)}\nText:"


def read_entries(path: Any) -> list[Entry]:
    """Entries of a WebNLG JSON file; malformed content raises DataError naming the entry."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a WebNLG JSON file with an 'entries' list: {err}") from err
    entries = []
    for i, item in enumerate(raw):
        try:
            (e,) = item.values()
            triples = tuple(
                (t["subject"], t["property"], t["object"]) for t in e["modifiedtripleset"]
            )
            texts = tuple(lex["lex"] for lex in e["lexicalisations"])
            entries.append(Entry(e["category"], triples, texts))
        except (AttributeError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{path}: entry {i} lacks category/modifiedtripleset/lexicalisations: {err!r}"
            ) from err
        if not triples or not texts:
            raise DataError(f"{path}: entry {i} has no triples or no lexicalisation")
    if not entries:
        raise DataError(f"{path}: holds no entries")
    return entries


@register_task("webnlg")
class WebNLGTask:
    """Triples -> text with a causal LM; per-client BLEU, ROUGE-L and loss."""

    def __init__(self, cfg: Config) -> None:
        if cfg.data.path is None:
            raise ConfigError(
                "data.path: webnlg reads local files; point it at a folder holding "
                f"{cfg.data.split}.json in the WebNLG 2017 JSON layout "
                "(e.g. ../shared/data/webnlg2017)"
            )
        self.cfg = cfg
        self.file = find_split_file(cfg.data.path, cfg.data.split, "json")
        self.family = models().model_family(cfg.model)
        self._entries: list[Entry] | None = None
        self._splits: ClientSplits | None = None
        self._tokenizer = None
        self._clients: dict[int, ClientData] = {}

    # ------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        model, self._tokenizer, self.family = models().load_model(self.cfg.model, "causal_lm")
        if self.cfg.model.lm_logits == "targets":
            lm.check_target_logits(model)
        return model

    def head_names(self, model: nn.Module) -> list[str]:
        return []  # the LM head stays frozen (GPT-2/SmolLM2 tie it to the embeddings)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = models().load_tokenizer(self.cfg.model)
        return self._tokenizer

    # ------------------------------------------------------------ data
    def entries(self) -> list[Entry]:
        if self._entries is None:
            self._entries = read_entries(self.file)
        return self._entries

    def splits(self) -> ClientSplits:
        """The entries' partition over all clients (categories are labels and groups)."""
        if self._splits is None:
            entries = self.entries()
            names = np.array([e.category for e in entries])
            _, category = np.unique(names, return_inverse=True)
            self._splits = ClientSplits(self.cfg, len(entries), category, names, str(self.file))
        return self._splits

    def check_data(self) -> None:
        self.splits().check()

    def client_data(self, client_ids: Sequence[int]) -> dict[int, ClientData]:
        missing = [k for k in client_ids if k not in self._clients]
        if missing:
            entries = self.entries()
            splits = self.splits()(missing)
            for k, (train, val, test) in splits.items():
                tr = [(entries[i], t) for i in train for t in entries[i].texts]
                self._clients[k] = ClientData(
                    k,
                    self._examples(tr),
                    self._scored(entries, test),
                    val=self._scored(entries, val) if val.size else None,
                )
        return {k: self._clients[k] for k in client_ids}

    def _scored(self, entries: list[Entry], idx: np.ndarray) -> Examples:
        """Entries scored by evaluation: one row each, with its prompt and every reference."""
        split = self._examples([(entries[i], entries[i].texts[0]) for i in idx])
        split.extra["prompt"] = [self._prompt_ids(entries[i]) for i in idx]
        split.extra["references"] = [list(entries[i].texts) for i in idx]
        return split

    def _prompt_ids(self, entry: Entry) -> list[int]:
        ids = self.tokenizer(prompt_of(entry), add_special_tokens=False)["input_ids"]
        return ids[: self.cfg.data.max_length // 2]

    def _examples(self, pairs: list[tuple[Entry, str]]) -> Examples:
        """Prompt + `` text</s>`` rows, truncated to data.max_length (prompt to half of it)."""
        tok, limit = self.tokenizer, self.cfg.data.max_length
        targets = tok([f" {text}" for _, text in pairs], add_special_tokens=False)["input_ids"]
        rows = []
        for (entry, _), target in zip(pairs, targets, strict=True):
            prompt = self._prompt_ids(entry)
            target = (target + [tok.eos_token_id])[: limit - len(prompt)]
            ids = prompt + target
            rows.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "labels": [-100] * len(prompt) + target,
                }
            )
        return Examples(rows)

    def batch(self, split: Examples, idx: np.ndarray) -> Batch:
        return pad([split.rows[i] for i in idx], self.tokenizer.pad_token_id)

    # ------------------------------------------------------------ loss and metrics
    def _token_losses(
        self, model: nn.Module, params: Params, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over target tokens, and their count."""
        return lm.token_losses(model, params, batch, self.cfg.model.lm_logits)

    def loss_weight(self, batch: Batch) -> float:
        """How many target tokens :meth:`loss` averages over (weights micro-batches)."""
        return lm.target_count(batch)

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the target tokens of the batch."""
        total, count = self._token_losses(model, params, batch)
        return total / count.clamp(min=1)

    def generate(self, model: nn.Module, params: Params, prompts: list[list[int]]) -> list[str]:
        """Decoded continuations of ``prompts`` (greedy, or beam search with data.num_beams)."""
        d = self.cfg.data
        return lm.generate(
            model, params, prompts, self.tokenizer, d.max_new_tokens, d.num_beams,
            d.eval_batch_size,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, params: Params, data: ClientData) -> dict[str, float]:
        test, size = data.test, self.cfg.data.eval_batch_size
        total, count = 0.0, 0
        for start in range(0, len(test), size):
            t, c = self._token_losses(
                model, params, self.batch(test, np.arange(start, min(start + size, len(test))))
            )
            total, count = total + float(t), count + int(c)
        hyps = self.generate(model, params, test.extra["prompt"])
        refs = test.extra["references"]
        return {
            "loss": total / max(count, 1),
            "bleu": metrics.bleu(hyps, refs),
            "rouge_l": metrics.rouge_l(hyps, refs),
        }
