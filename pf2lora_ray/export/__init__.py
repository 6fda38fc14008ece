"""Export a client's personalized model as a standard PEFT LoRA adapter, and predict with it.

Client k's adapted layer computes W0 + s B A + s~ D_k C_k (PF2LORA.md, Model), and

    s B A + s~ D_k C_k = [s B, s~ D_k] @ [A; C_k],

so client k's whole update is ONE LoRA of rank r + r~ per layer with
``lora_B = [s B, s~ D_k]`` (m x (r + r~)) and ``lora_A = [A; C_k]`` ((r + r~) x n).
The export folds the scales into lora_B and sets ``lora_alpha = r + r~`` so that
PEFT's own scaling lora_alpha / r is exactly 1. ``--shared-only`` exports the
global adapter theta alone (lora_A = A, lora_B = s B; PF2LoRA's C, D dropped).

Every algorithm exports alike: a layer's A, B, C, D are looked up by name in the
parameters the client is evaluated with (``Algorithm.eval_params`` of
{**theta, **phi_k}), so LoRA factors that an algorithm keeps personal (local-only
LoRA, FedSA-LoRA's B) and evaluation-time personalisation (Per-FedAvg's step,
HetLoRA's rank truncation, HOMLoRA-FT's fine-tune, at the checkpoint's round)
are exported as the simulation evaluated them.

An export folder ``OUT`` holds::

    adapter_config.json        peft LoraConfig (task_type SEQ_CLS / CAUSAL_LM, r, target_modules...)
    adapter_model.safetensors  base_model.model.<layer>.lora_A.weight / .lora_B.weight,
                               and the trained head as base_model.model.<head>.weight/.bias
    pf2lora.json               provenance: run id, client, round, model, task, label names
    tokenizer files            so prediction works offline
    base_model/                only when the base model was built in code (tiny-*): its weights

Loading an export with PEFT (any transformers model; the head is restored from
the adapter, so ``num_labels`` must match)::

    import json
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = "exports/client3"
    info = json.load(open(f"{out}/pf2lora.json"))
    base = AutoModelForSequenceClassification.from_pretrained(
        info["base_model"], num_labels=info["num_labels"]
    )
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = model(**tokenizer("a gorgeous film", return_tensors="pt")).logits
    print(info["labels"][int(logits.argmax(-1))])

(``AutoModelForCausalLM`` for ``task_type: CAUSAL_LM``; pass ``gguf_file=info["gguf_file"]``
when it is set.) Or from the command line: ``pf2lora export RUN --client 3 --to OUT``
then ``pf2lora predict OUT --text "a gorgeous film"``.

Modules: :mod:`~pf2lora_ray.export.writer` (run -> adapter folder) and
:mod:`~pf2lora_ray.export.predict` (adapter folder -> predictions).
"""

from pf2lora_ray.export.predict import load_export, predict, predict_many
from pf2lora_ray.export.writer import (
    BASE_DIR,
    INFO_FILE,
    PREFIX,
    check_client,
    client_params,
    export_peft,
    label_names,
    load_run,
    peft_state,
    peft_task_type,
)

__all__ = [
    "BASE_DIR",
    "INFO_FILE",
    "PREFIX",
    "check_client",
    "client_params",
    "export_peft",
    "label_names",
    "load_export",
    "load_run",
    "peft_state",
    "peft_task_type",
    "predict",
    "predict_many",
]
