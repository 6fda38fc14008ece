"""Write a client's model of a run as a PEFT LoRA adapter (the math: :mod:`pf2lora_ray.export`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pf2lora_ray import seeds
from pf2lora_ray.algorithms.base import Tensors
from pf2lora_ray.checkpoint import CheckpointError, has_checkpoint, load_checkpoint
from pf2lora_ray.client import Arrays, ClientHost
from pf2lora_ray.config import Config, load_config
from pf2lora_ray.lora import SHARED_FACTORS, TwoLevelLoRALinear, factor_names, lora_layers
from pf2lora_ray.results import run_id_for
from pf2lora_ray.storage import Location, check_folder, location
from pf2lora_ray.tasks import Task
from pf2lora_ray.validate import UsageError, check_names

INFO_FILE = "pf2lora.json"
BASE_DIR = "base_model"
PREFIX = "base_model.model."  # PEFT's key prefix (adapter name stripped)


# ------------------------------------------------------------------ reading a run


def load_run(run_dir: str | Path | Location) -> tuple[Config, int, Arrays, dict[int, Arrays]]:
    """(config, round, theta, personal) of a run folder's latest checkpoint.

    ``run_dir`` may be a local folder or a URI (:mod:`pf2lora_ray.storage`).

    Raises:
        UsageError: ``run_dir`` is not a run folder (no config.yaml).
        ConfigError: its config.yaml is damaged.
        CheckpointError: it holds no (readable) checkpoint.
    """
    run_dir = location(run_dir)
    if not (run_dir / "config.yaml").is_file():
        runs = [sub.name for sub in run_dir.iterdir() if (sub / "config.yaml").is_file()]
        hint = f"; it holds the runs {runs}, pass one of those folders" if runs else ""
        raise UsageError(f"{run_dir}: not a run folder (no config.yaml){hint}")
    with (run_dir / "config.yaml").local_file() as file:
        cfg = load_config(file)
    check_names(cfg)  # a config.yaml edited by hand may name no registered algorithm or task
    if not has_checkpoint(run_dir):
        raise CheckpointError(
            f"{run_dir}: no checkpoint (checkpoints/latest.json missing); export needs a run "
            "that finished, or one with checkpoint.every > 0 that completed a checkpointed round"
        )
    round_, theta, personal = load_checkpoint(run_dir, cfg)
    return cfg, round_, theta, personal


def _tensors(arrays: Arrays) -> Tensors:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def check_client(cfg: Config, client: int) -> None:
    """Raise UsageError unless ``client`` is one of the run's clients."""
    n = cfg.fed.num_clients
    if not 0 <= client < n:
        raise UsageError(f"--client {client}: the run has clients 0..{n - 1} (fed.num_clients={n})")


def client_params(
    host: ClientHost,
    round_: int,
    theta: Arrays,
    personal: dict[int, Arrays],
    client: int,
    shared_only: bool = False,
) -> Tensors:
    """Name-keyed model parameters of client ``client``'s model (or of the global one).

    Personalized: exactly what evaluation scores after round ``round_``
    (:meth:`ClientHost.eval_params` with the client's checkpointed phi restored on
    ``host``). Shared-only: theta; a head the algorithm keeps personal comes from
    ``client``'s phi, since there is no global head. Entries that are not model
    parameters (algorithm state such as HetLoRA's rank) are dropped.

    Raises:
        UsageError: the client is out of range, or ``shared_only`` for an
            algorithm that keeps LoRA factors personal (no global adapter).
        CheckpointError: the checkpoint lacks the client's personal state.
    """
    check_client(host.cfg, client)
    model = host.model
    names = dict(model.named_parameters())
    phi = personal.get(client, {})
    missing = [k for k in host.roles.personal if k not in phi]
    if missing:
        raise CheckpointError(
            f"checkpoint has no personal state {missing[:3]} for client {client}; "
            f"its clients are {sorted(personal)}"
        )
    theta_t = _tensors(theta)
    if shared_only:
        lora = factor_names(model, SHARED_FACTORS)
        kept = [k for k in lora if k not in theta]
        if kept:
            raise UsageError(
                f"--shared-only: algorithm {host.cfg.algorithm.name} keeps {kept[0]} (and "
                f"{len(kept) - 1} more LoRA factors) personal, so there is no global adapter; "
                "export a client's personalized adapter instead"
            )
        head = set(host.task.head_names(model))
        params = {**{k: v for k, v in _tensors(phi).items() if k in head}, **theta_t}
    else:
        host.set_personal({client: phi})
        params = host.eval_params(theta_t, round_, client)
    return {k: v.detach() for k, v in params.items() if k in names}


# ------------------------------------------------------------------ PEFT tensors


def peft_state(
    model: nn.Module, params: Tensors, head: list[str], shared_only: bool = False
) -> tuple[Tensors, int]:
    """(PEFT adapter tensors, LoRA rank) for ``params`` on the two-level ``model``.

    Each layer gives ``lora_A = [A; C]`` and ``lora_B = [s B, s~ D]`` (A, B only
    when ``shared_only``); factors absent from ``params`` keep the model's own
    values, as ``functional_call(model, params, strict=False)`` would. Head
    parameters are stored under their own names (PEFT's modules_to_save keys).
    """
    current = dict(model.named_parameters())
    out: Tensors = {}
    ranks = set()
    for layer, mod in lora_layers(model).items():

        def factor(f: str, layer: str = layer) -> torch.Tensor:
            return params.get(f"{layer}.{f}", current[f"{layer}.{f}"]).detach()

        a, b = factor("lora_A"), factor("lora_B") * mod.scaling
        if mod.r_personal and not shared_only:
            a = torch.cat([a, factor("lora_C")], dim=0)  # ((r + r~), n)
            b = torch.cat([b, factor("lora_D") * mod.scaling_personal], dim=1)  # (m, r + r~)
        out[f"{PREFIX}{layer}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{layer}.lora_B.weight"] = b.contiguous()
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"adapted layers have different ranks {sorted(ranks)}; expected one")
    for name in head:
        out[f"{PREFIX}{name}"] = params.get(name, current[name]).detach().contiguous()
    return out, ranks.pop()


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT task type of a transformers model: SEQ_CLS, CAUSAL_LM, or None (other modules)."""
    from transformers.models.auto import modeling_auto as auto

    cls = type(model).__name__
    if cls in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "SEQ_CLS"
    if cls in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "CAUSAL_LM"
    return None


def _is_conv1d(mod: TwoLevelLoRALinear) -> bool:
    return type(mod.base).__name__ == "Conv1D"


def label_names(task: Task, model: nn.Module) -> list[str] | None:
    """Class names in label-id order: the task's ``label_names`` (GLUE tasks keep them on
    their ``spec``), else the model config's id2label; None without a classifier."""
    names = getattr(task, "label_names", None) or getattr(
        getattr(task, "spec", None), "label_names", None
    )
    if names:
        return [str(n) for n in names]
    if peft_task_type(model) != "SEQ_CLS" or model.config.num_labels < 2:
        return None
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


# ------------------------------------------------------------------ export


def _check_out(out: Location) -> None:
    check_folder(out, "--to")
    if out.exists() and (not out.is_dir() or out.iterdir()):
        raise UsageError(f"--to {out}: already exists and is not an empty folder; choose a new one")


def _base_reference(model: nn.Module, base_model: str | Path | None) -> str | None:
    """Where ``from_pretrained`` finds the base: given path, the model's own name or path.

    None when the model was built in code (no name) or is not a transformers model.
    """
    if base_model is not None:
        path = Path(base_model)
        return str(path.resolve()) if path.exists() else str(base_model)
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def export_peft(
    run_dir: str | Path | Location,
    client: int,
    to: str | Path | Location,
    shared_only: bool = False,
    base_model: str | Path | None = None,
) -> Location:
    """Write client ``client``'s personalized model of a run as a PEFT LoRA adapter.

    Args:
        run_dir: a run folder (config.yaml + checkpoints/); the latest checkpoint is used.
            A local path or a URI.
        client: the client id, in [0, fed.num_clients).
        to: the export folder (a local path or a URI); must not exist or be empty.
        shared_only: export the global adapter theta alone (rank r).
        base_model: folder or hub name to record as ``base_model_name_or_path``
            (must hold the run's frozen base weights). Default: the model's own
            name or path; a model built in code (tiny-*) is saved into
            ``to/base_model`` and that folder is recorded.

    Returns:
        The export folder.

    Raises:
        UsageError, CheckpointError: bad run folder, client or output folder (named).
    """
    from peft import LoraConfig

    out = location(to)
    out = location(out.local.resolve()) if out.is_local else out
    run_dir = location(run_dir)
    cfg, round_, theta, personal = load_run(run_dir)
    check_client(cfg, client)
    _check_out(out)
    # The client's model is built by the code evaluation uses (one ClientHost
    # serving this client), so the export is the model the run scored.
    host = ClientHost(cfg, [client], device="cpu")
    model, task = host.model, host.task
    head = task.head_names(model)
    params = client_params(host, round_, theta, personal, client, shared_only)
    tensors, rank = peft_state(model, params, head, shared_only)
    layers = lora_layers(model)
    base_ref = _base_reference(model, base_model)
    is_hf = hasattr(model, "save_pretrained")
    save_base = is_hf and base_ref is None
    if save_base:
        base_ref = (out / BASE_DIR).portable
    config = LoraConfig(
        task_type=peft_task_type(model),
        r=rank,
        lora_alpha=rank,  # PEFT scales by lora_alpha / r = 1: the scales are in lora_B
        lora_dropout=0.0,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in layers}),
        fan_in_fan_out=any(_is_conv1d(m) for m in layers.values()),
        modules_to_save=sorted({n.rsplit(".", 1)[0] for n in head}) or None,
        bias="none",
        base_model_name_or_path=base_ref,
        inference_mode=True,
    )
    labels = label_names(task, model)
    info = {
        "run_id": run_id_for(cfg),
        "run_dir": run_dir.portable,
        "client": None if shared_only else client,
        "shared_only": shared_only,
        "round": round_,
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "base_model": base_ref,
        "gguf_file": _gguf_file(cfg) if base_model is None else None,
        "dtype": cfg.model.dtype,
        "task_type": config.task_type,
        "data": cfg.data.name,
        "task": cfg.data.task,
        "labels": labels,
        "num_labels": model.config.num_labels if config.task_type == "SEQ_CLS" else None,
        "max_length": cfg.data.max_length,
        "rank": rank,
        "folded": "lora_A = [A; C_k], lora_B = [s*B, s~*D_k], lora_alpha = r",
        # Generation tasks: the prompt and decoding settings predict must reuse.
        **(task.export_info() if hasattr(task, "export_info") else {}),
    }
    with tempfile.TemporaryDirectory(prefix="pf2lora-export-") as scratch:
        # Built in a local folder, then published whole: renamed into place locally,
        # or uploaded with pf2lora.json last (what load_export looks for) to a bucket.
        tmp = out.local.parent / f".{out.name}.tmp" if out.is_local else Path(scratch) / "export"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _write(tmp, config, tensors, info)
            if is_hf:
                _save_tokenizer(cfg, tmp)
            if save_base:
                torch.manual_seed(
                    seeds.derive(cfg.seed, seeds.MODEL_INIT)
                )  # as build_adapted_model
                task.build_model().save_pretrained(tmp / BASE_DIR)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_file(cfg: Config) -> str | None:
    """The GGUF file the base model was read from (``smollm2`` names its own)."""
    from pf2lora_ray.models import resolve

    return resolve(cfg.model)[1]


def _publish(folder: Path, out: Location) -> None:
    """Make the finished export ``folder`` appear at ``out`` (see export_peft)."""
    if out.is_local:
        if out.exists():
            out.local.rmdir()  # empty, checked above
        os.replace(folder, out.path)
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == INFO_FILE)  # the marker goes last
    for file in files:
        (out / file.relative_to(folder).as_posix()).write_with(
            lambda tmp, src=file: shutil.copyfile(src, tmp)
        )


def _write(folder: Path, config: Any, tensors: Tensors, info: dict) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(str(folder))
    save_file(dict(sorted(tensors.items())), str(folder / "adapter_model.safetensors"))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _save_tokenizer(cfg: Config, folder: Path) -> None:
    from pf2lora_ray.models import load_tokenizer

    load_tokenizer(cfg.model).save_pretrained(str(folder))
