"""HOMLoRA + local fine-tuning: FedAvg-LoRA, then E local steps per client before evaluation.

The "FedAvg + fine-tune" personalisation baseline (e.g. Wang et al., "Federated
Evaluation of On-device Personalization", arXiv:1910.10252; Yu, Bagdasaryan,
Shmatikov, "Salvaging Federated Learning by Local Adaptation", arXiv:2002.04758)
applied to LoRA (Hu et al., ICLR 2022) trained by FedAvg (McMahan et al.,
AISTATS 2017).

Communicated: A, B (and the head when ``model.head: shared``), exactly as HOMLoRA.
Local: nothing persists. Before each evaluation client k fine-tunes a copy of
(theta, phi_k) for ``finetune.steps`` AdamW steps (lr ``algorithm.lr``) on its
own train split and is evaluated with the result; the copy is then dropped, so
training is unaffected.
"""

from __future__ import annotations

from pf2lora_ray import seeds
from pf2lora_ray.algorithms.base import Algorithm, ClientRound, register
from pf2lora_ray.tasks.base import Params


@register("homlora_ft")
class HOMLoRAFinetune(Algorithm):
    """HOMLoRA training; evaluation after ``finetune.steps`` local AdamW steps."""

    def eval_params(self, client: ClientRound) -> Params:
        params, steps = client.params, self.cfg.finetune.steps
        _, tuned = self.adamw(client, params, sorted(params), steps, seeds.FINETUNE)
        return tuned
