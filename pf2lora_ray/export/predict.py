"""Load an export with PEFT and run it on text (``pf2lora predict OUT --text ...``).

A classifier's export prints its label; a generation task's export (webnlg,
text2text) wraps the source in the prompt the run trained with (recorded in
``pf2lora.json``) and prints the decoded text, with the run's decoding settings
(:func:`pf2lora_ray.tasks.lm.decode`, the code evaluation uses). A WebNLG
source may be given as triples (``--triple S P O``), linearised as in training.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from pf2lora_ray.export.writer import BASE_DIR, INFO_FILE
from pf2lora_ray.storage import location
from pf2lora_ray.validate import UsageError, one_line


def load_export(adapter_dir: str | Path) -> tuple[nn.Module, Any, dict]:
    """(PeftModel in eval mode, tokenizer, pf2lora.json) of an export folder.

    ``adapter_dir`` may be a URI (:mod:`pf2lora_ray.storage`): the folder is
    downloaded to a temporary folder for loading.

    Raises:
        UsageError: not an export folder, or an export whose base is not a
            transformers model (synthetic; load it onto your module with
            ``PeftModel.from_pretrained(module, OUT)``).
    """
    where = location(adapter_dir)
    if where.is_local:
        return _load_export(where.local)
    if not (where / INFO_FILE).is_file():
        raise UsageError(f"{where}: not a pf2lora export (no {INFO_FILE})")
    with tempfile.TemporaryDirectory(prefix="pf2lora-export-") as tmp:
        return _load_export(where.download(Path(tmp) / where.name))


def _load_export(folder: Path) -> tuple[nn.Module, Any, dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if not (folder / INFO_FILE).is_file() or not (folder / "adapter_config.json").is_file():
        raise UsageError(
            f"{folder}: not a pf2lora export (needs {INFO_FILE} and adapter_config.json); "
            "write one with `pf2lora export RUN --client K --to OUT`"
        )
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        info["task_type"], info["dtype"], info["base_model"]  # noqa: B018 (checks the keys)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"{folder / INFO_FILE}: damaged export metadata ({err!r})") from err
    autos = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM}
    if info["task_type"] not in autos:
        raise UsageError(
            f"{folder}: model {info['model']!r} is not a transformers text model, so there is "
            "nothing to predict from text; load the adapter onto your own module with "
            "peft.PeftModel.from_pretrained(module, OUT)"
        )
    # A moved export keeps its saved base model beside the adapter.
    base = folder / BASE_DIR if (folder / BASE_DIR).is_dir() else info["base_model"]
    kwargs: dict[str, Any] = {"dtype": getattr(torch, info["dtype"])}
    if info.get("gguf_file"):
        kwargs["gguf_file"] = info["gguf_file"]
    if info["task_type"] == "SEQ_CLS" and info.get("num_labels"):
        kwargs["num_labels"] = info["num_labels"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = _load_base(autos[info["task_type"]], str(base), kwargs, folder)
    if model.config.pad_token_id is None:
        # As models.load_model: GPT-2/Llama classifiers pool the last non-pad token.
        model.config.pad_token_id = tokenizer.pad_token_id
    try:
        adapted = PeftModel.from_pretrained(model, str(folder)).eval()
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise UsageError(f"{folder}: damaged adapter files ({one_line(err)[:200]})") from err
    return adapted, tokenizer, info


def _load_base(auto: Any, base: str, kwargs: dict[str, Any], folder: Path) -> nn.Module:
    """The base model; every weight must come from ``base`` except the adapter's head.

    transformers' load report would call the head "newly initialized" although
    the adapter restores it, so the report is muted for this one call and the
    missing weights are checked here instead.
    """
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, loading = auto.from_pretrained(base, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    restored = tuple(f"{m}." for m in LoraConfig.from_pretrained(str(folder)).modules_to_save or ())
    missing = sorted(k for k in loading["missing_keys"] if not k.startswith(restored))
    if missing:
        raise UsageError(
            f"{base}: base model lacks {len(missing)} weights ({', '.join(missing[:3])}...), so "
            "it is not the run's base model; export again with the right base_model"
        )
    return model


@torch.no_grad()
def predict(adapter_dir: str | Path, text: str, max_new_tokens: int | None = None) -> str:
    """Run an export on ``text``: the label and class probabilities, or generated text.

    Classification gives ``label  (name p, name p, ...)``; a one-output
    regression head gives ``score x``; a causal LM gives its decoded continuation
    of ``text`` wrapped in the export's prompt (up to ``max_new_tokens`` tokens;
    default: the run's ``data.max_new_tokens``, or 32 for an export without one).
    """
    return predict_many(adapter_dir, [text], max_new_tokens)[0]


@torch.no_grad()
def predict_many(
    adapter_dir: str | Path, texts: Sequence[str], max_new_tokens: int | None = None
) -> list[str]:
    """:func:`predict` for several texts, loading the model once."""
    model, tokenizer, info = load_export(adapter_dir)
    if info["task_type"] == "CAUSAL_LM":
        return _generate(model, tokenizer, info, texts, max_new_tokens)
    return [_classify(model, tokenizer, info, t) for t in texts]


def triples_source(adapter_dir: str | Path, triples: Sequence[Sequence[str]]) -> str:
    """The source string of a triple set, for an export whose task reads triples.

    Raises:
        UsageError: the export's task does not read triples (it takes ``--text``).
    """
    from pf2lora_ray.tasks.webnlg import linearise

    folder = Path(adapter_dir)
    info = json.loads((folder / INFO_FILE).read_text()) if (folder / INFO_FILE).is_file() else {}
    if info.get("source_format") != "triples":
        raise UsageError(
            f"--triple: {folder} was trained on data.name={info.get('data')!r}, whose source is "
            "text, not triples; give it with --text"
        )
    return linearise([tuple(t) for t in triples])


def _generate(
    model: nn.Module, tokenizer: Any, info: dict, sources: Sequence[str], max_new: int | None
) -> list[str]:
    """Decoded texts for ``sources``, each inside the export's prompt, as evaluation decodes."""
    from pf2lora_ray.tasks.generation import fill
    from pf2lora_ray.tasks.lm import decode

    prompt = info.get("prompt", "{source}")  # exports from before prompts were recorded
    limit = info.get("prompt_max_tokens", info["max_length"])
    prompts = [
        tokenizer(fill(prompt, s), add_special_tokens=False)["input_ids"][:limit] for s in sources
    ]
    new = max_new or info.get("max_new_tokens", 32)
    device = next(model.parameters()).device
    return decode(
        model.generate, prompts, tokenizer, new, info.get("num_beams", 1), len(prompts), device
    )


def _classify(model: nn.Module, tokenizer: Any, info: dict, text: str) -> str:
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=info["max_length"])
    logits = model(**enc).logits[0].float()  # (num_labels,)
    if logits.numel() == 1:
        return f"score {float(logits[0]):.4f}"
    probs = torch.softmax(logits, -1).tolist()
    labels = info.get("labels") or [str(i) for i in range(len(probs))]
    detail = ", ".join(f"{name} {p:.3f}" for name, p in zip(labels, probs, strict=True))
    return f"{labels[int(np.argmax(probs))]}  ({detail})"
