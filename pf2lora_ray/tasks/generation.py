"""Data-to-text generation with a causal LM: the part every generation task shares.

A generation task reads *entries*: a source (linearised triples, a table row, a
question...) with one or more reference texts and a group (a WebNLG category,
a ``data.group_column`` value). A causal LM reads the source inside a prompt
(``data.prompt``, with ``{source}`` where the source goes; each task has a
default) and writes the text; the loss counts only the text's tokens
(:mod:`pf2lora_ray.tasks.lm`).

Clients split *entries*, so all references of an entry stay together:
``data.partition: task`` gives each client one group (or a share of one),
``iid`` deals entries at random, ``dirichlet`` / ``label_sort`` skew by group.
Each client's entries are split into train and test (``data.test_fraction``),
and ``data.val_fraction`` of the train share is held out for validation;
every reference of a train entry is a training example, and each validation or
test entry is decoded once and scored against all its references.
``data.max_train_per_client`` / ``max_val_per_client`` / ``max_test_per_client``
count entries. The driver draws this split once and hands each host the file rows
of its clients' entries (:meth:`GenerationTask.client_rows`); a host reads only
those (:meth:`GenerationTask.read_entries` with ``rows``).

Evaluation decodes greedily (or with ``data.num_beams`` beams) for at most
``data.max_new_tokens`` tokens and reports ``bleu``, ``chrf``, ``ter`` (sacrebleu,
0-100; the PF2LoRA paper prints BLEU on 0-1), ``rouge_l`` (rouge-score, 0-1)
and the teacher-forced ``loss`` on each test entry's first reference.

A subclass sets :attr:`GenerationTask.name` and :attr:`default_prompt` and
implements :meth:`read_entries`; ``pf2lora export`` records the prompt so that
``pf2lora predict`` wraps a source exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

import pf2lora_ray.tasks.lm as lm
from pf2lora_ray import metrics
from pf2lora_ray.config import Config
from pf2lora_ray.tasks.base import Batch, ClientData, ClientRows, Params, Rows
from pf2lora_ray.tasks.glue import models
from pf2lora_ray.tasks.text import ClientSplits, Examples, pad, truncation

SOURCE = "{source}"


@dataclass(frozen=True)
class Entry:
    """One source with its reference texts, its group (category) and the file rows
    (0-based positions, ascending) it was read from."""

    source: str
    references: tuple[str, ...]
    group: str = ""
    rows: tuple[int, ...] = ()


def fill(prompt: str, source: str) -> str:
    """``prompt`` with ``{source}`` replaced (no other brace is interpreted)."""
    return prompt.replace(SOURCE, source)


class GenerationTask:
    """Source -> text with a causal LM; per-client BLEU, chrF, TER, ROUGE-L and loss.

    Args:
        cfg: the run's config.
        file: the data file of ``data.split`` (read by :meth:`read_entries`).
    """

    name: ClassVar[str] = ""
    default_prompt: ClassVar[str] = f"{SOURCE}\nText:"
    # How `pf2lora predict` reads a source: "text", or "triples" (--triple S P O).
    source_format: ClassVar[str] = "text"

    def __init__(self, cfg: Config, file: Path) -> None:
        self.cfg = cfg
        self.file = file
        self.prompt = cfg.data.prompt or self.default_prompt
        self.family = models().model_family(cfg.model)
        self._entries: list[Entry] | None = None
        self._splits: ClientSplits | None = None
        self._tokenizer = None
        self._clients: dict[int, ClientData] = {}

    def read_entries(self, rows: np.ndarray | None = None) -> list[Entry]:
        """Every entry of :attr:`file` in file order, each with the file rows it holds.

        Args:
            rows: sorted file rows; only the entries made of them are read (each
                entry's rows are all in ``rows`` or none is). None: all.

        Raises:
            DataError: the file is missing, malformed or empty (the message names it).
        """
        raise NotImplementedError

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
            self._entries = self.read_entries()
        return self._entries

    def splits(self) -> ClientSplits:
        """The entries' partition over all clients (groups are labels and task groups)."""
        if self._splits is None:
            entries = self.entries()
            names = np.array([e.group for e in entries])
            _, codes = np.unique(names, return_inverse=True)
            self._splits = ClientSplits(self.cfg, len(entries), codes, names, str(self.file))
        return self._splits

    def check_data(self) -> dict[str, float]:
        """Partition check, then what ``data.max_length`` cuts of each split's examples.

        An example is cut when its prompt is longer than half of ``data.max_length``
        or prompt + text + end-of-text is longer than ``data.max_length``
        (:meth:`_examples`): the length it needs whole is ``max(2 * prompt, prompt +
        text + 1)``. Train counts every (entry, reference) pair a client trains on;
        val and test count each scored entry once, with the first reference its loss
        row holds. Besides :func:`~pf2lora_ray.tasks.text.truncation`'s keys,
        ``prompt_cut.<split>`` is the share whose prompt alone is cut: what decoding
        reads and scores, whatever the text.
        """
        splits = self.splits()
        splits.check()
        entries = self.entries()
        shares = splits(range(self.cfg.fed.num_clients)).values()
        limit = self.cfg.data.max_length
        needed, prompt_cut = {}, {}
        for i, split in enumerate(("train", "val", "test")):
            idx = np.concatenate([share[i] for share in shares])
            keep = None if split == "train" else 1  # val/test: the loss row's reference
            pairs = [(entries[j], text) for j in idx for text in entries[j].references[:keep]]
            prompt, target = (
                np.array([len(x) for x in ids], dtype=np.int64) for ids in self._encode(pairs)
            )
            needed[split] = np.maximum(2 * prompt, prompt + target)
            if prompt.size:  # an empty split (no validation entries) has no share
                prompt_cut[f"prompt_cut.{split}"] = float(np.mean(2 * prompt > limit))
        return {**truncation(needed, limit), **prompt_cut}

    def client_rows(self, client_ids: Sequence[int]) -> ClientRows:
        """The file rows of each client's train, val and test entries (the partition)."""
        entries = self.entries()

        def file_rows(idx: np.ndarray) -> np.ndarray:
            return np.array(sorted(r for i in idx for r in entries[i].rows), np.int64)

        return {k: Rows(*map(file_rows, split)) for k, split in self.splits()(client_ids).items()}

    def client_data(
        self, client_ids: Sequence[int], rows: ClientRows | None = None
    ) -> dict[int, ClientData]:
        """The clients' tokenized examples, built once per client and task instance.

        With ``rows`` (:meth:`client_rows`), only the entries of the missing clients'
        rows are read (:meth:`read_entries`) and the partition is not drawn; without,
        every entry is read and the partition drawn.
        """
        missing = [k for k in client_ids if k not in self._clients]
        if not missing:
            return {k: self._clients[k] for k in client_ids}
        if rows is None:
            entries = self.entries()
            shares = {
                k: [[entries[i] for i in idx] for idx in split]
                for k, split in self.splits()(missing).items()
            }
        else:
            wanted = np.unique(np.concatenate([i for k in missing for i in rows[k]]))
            # An entry's rows all lie in one split of one client: it is found by its first.
            first = {e.rows[0]: e for e in self.read_entries(wanted)}
            shares = {
                k: [[first[r] for r in idx if r in first] for idx in rows[k]] for k in missing
            }
        for k, (train, val, test) in shares.items():
            pairs = [(entry, text) for entry in train for text in entry.references]
            self._clients[k] = ClientData(
                k,
                self._examples(pairs),
                self._scored(test),
                val=self._scored(val) if val else None,
            )
        return {k: self._clients[k] for k in client_ids}

    def _scored(self, entries: list[Entry]) -> Examples:
        """Entries scored by evaluation: one row each (its first reference, for the loss),
        with its prompt and every reference."""
        split = self._examples([(entry, entry.references[0]) for entry in entries])
        split.extra["prompt"] = [self.prompt_ids(entry.source) for entry in entries]
        split.extra["references"] = [list(entry.references) for entry in entries]
        return split

    def prompt_ids(self, source: str) -> list[int]:
        """Token ids of the prompt around ``source``, cut to half of ``data.max_length``."""
        ids = self.tokenizer(fill(self.prompt, source), add_special_tokens=False)["input_ids"]
        return ids[: self.cfg.data.max_length // 2]

    def _encode(self, pairs: list[tuple[Entry, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """Untruncated token ids of each pair: (its prompt, `` text`` + end-of-text)."""
        tok = self.tokenizer
        if not pairs:
            return [], []
        prompts = [fill(self.prompt, entry.source) for entry, _ in pairs]
        prompts = tok(prompts, add_special_tokens=False)["input_ids"]
        targets = tok([f" {text}" for _, text in pairs], add_special_tokens=False)["input_ids"]
        return prompts, [t + [tok.eos_token_id] for t in targets]

    def _examples(self, pairs: list[tuple[Entry, str]]) -> Examples:
        """Prompt + `` text</s>`` rows, truncated to data.max_length (prompt to half of it)."""
        limit = self.cfg.data.max_length
        rows = []
        for prompt, target in zip(*self._encode(pairs), strict=True):
            prompt = prompt[: limit // 2]
            target = target[: limit - len(prompt)]
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
    def loss_weight(self, batch: Batch) -> float:
        """How many target tokens :meth:`loss` averages over (weights micro-batches)."""
        return lm.target_count(batch)

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the target tokens of the batch."""
        total, count = lm.token_losses(model, params, batch, self.cfg.model.lm_logits)
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
            batch = self.batch(test, np.arange(start, min(start + size, len(test))))
            t, c = lm.token_losses(model, params, batch, self.cfg.model.lm_logits)
            total, count = total + float(t), count + int(c)
        hyps = self.generate(model, params, test.extra["prompt"])
        return {
            "loss": total / max(count, 1),
            **metrics.generation_scores(hyps, test.extra["references"]),
        }

    def export_info(self) -> dict[str, Any]:
        """What ``pf2lora predict`` needs to wrap and decode a source as this task did."""
        d = self.cfg.data
        return {
            "prompt": self.prompt,
            "source_format": self.source_format,
            "prompt_max_tokens": d.max_length // 2,
            "max_new_tokens": d.max_new_tokens,
            "num_beams": d.num_beams,
        }
