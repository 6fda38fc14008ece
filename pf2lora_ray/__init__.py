"""pf2lora_ray: PF2LoRA and federated LoRA baselines, simulated on Ray.

Entry points: the ``pf2lora`` command (:mod:`pf2lora_ray.cli`) and
:func:`pf2lora_ray.driver.run` for Python use.
"""

__version__ = "0.1.0"
