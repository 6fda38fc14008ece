"""WebNLG 2017 data-to-text (the paper's NLG experiment) behind the Task protocol.

Each WebNLG entry is a set of DBpedia triples with one or more human
lexicalisations and a category. ``data.path`` is a folder holding
``<data.split>.json`` in the JSON layout of microsoft/LoRA (``{"entries": [{"1":
{category, modifiedtripleset, lexicalisations, ...}}, ...]}``; see
../shared/data/README.md), read with the standard ``json`` module because the
nested layout is not a table.

The triples are linearised as ``subject : property : object | ...`` (the usual
GPT-2 WebNLG input) into the prompt ``Triples: {source}\\nText:`` (``data.prompt``
overrides it); the category is the entry's group, so ``data.partition: task``
gives each client one category. Everything else (client splits, the loss,
decoding, BLEU / chrF / TER / ROUGE-L, what an export records) is the shared
generation code of :mod:`pf2lora_ray.tasks.generation`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks.base import DataError, register_task
from pf2lora_ray.tasks.generation import SOURCE, Entry, GenerationTask
from pf2lora_ray.tasks.text import find_split_file


def _clean(term: str) -> str:
    """DBpedia term -> words: ``Aarhus_Airport`` -> ``Aarhus Airport``, outer quotes dropped."""
    return term.replace("_", " ").strip().strip('"').strip()


def linearise(triples: Sequence[tuple[str, str, str]]) -> str:
    """``subject : property : object | ...`` (the usual GPT-2 WebNLG input format)."""
    return " | ".join(f"{_clean(s)} : {p} : {_clean(o)}" for s, p, o in triples)


def read_entries(path: Path, rows: Sequence[int] | None = None) -> list[Entry]:
    """Entries of a WebNLG JSON file; malformed content raises DataError naming the entry.

    Each becomes an :class:`Entry` with the linearised triples as its source, its
    lexicalisations as references, its category as group and its position in the
    file's entry list as its one row. ``rows`` picks entries by position: the JSON
    document is parsed whole on each call (it has no index to seek an entry by),
    and only those entries are read.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a WebNLG JSON file with an 'entries' list: {err}") from err
    entries = []
    for i in range(len(raw)) if rows is None else (int(r) for r in rows):
        if i >= len(raw):
            raise DataError(
                f"{path}: holds {len(raw)} entries, but entry {i} was asked for; every node "
                "must read the same file the driver partitioned"
            )
        item = raw[i]
        try:
            (e,) = item.values()
            triples = tuple(
                (t["subject"], t["property"], t["object"]) for t in e["modifiedtripleset"]
            )
            texts = tuple(lex["lex"] for lex in e["lexicalisations"])
            category = e["category"]
        except (AttributeError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{path}: entry {i} lacks category/modifiedtripleset/lexicalisations: {err!r}"
            ) from err
        if not triples or not texts:
            raise DataError(f"{path}: entry {i} has no triples or no lexicalisation")
        entries.append(Entry(linearise(triples), texts, category, (i,)))
    if not entries:
        raise DataError(f"{path}: holds no entries")
    return entries


@register_task("webnlg")
class WebNLGTask(GenerationTask):
    """Triples -> text with a causal LM, one DBpedia category per group."""

    name = "webnlg"
    default_prompt = f"Triples: {SOURCE}\nText:"
    source_format = "triples"

    def __init__(self, cfg: Config) -> None:
        if cfg.data.path is None:
            raise ConfigError(
                "data.path: webnlg reads local files; point it at a folder holding "
                f"{cfg.data.split}.json in the WebNLG 2017 JSON layout "
                "(e.g. ../shared/data/webnlg2017)"
            )
        super().__init__(cfg, find_split_file(cfg.data.path, cfg.data.split, "json"))

    def read_entries(self, rows: Sequence[int] | None = None) -> list[Entry]:
        return read_entries(self.file, rows)
