"""Tasks: model + client data + loss + metrics, found by name in :data:`TASKS`."""

from __future__ import annotations

from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.tasks import glue, synthetic, text2text, webnlg  # noqa: F401  (register names)
from pf2lora_ray.tasks.base import TASKS, ClientData, Task, register_task

__all__ = ["TASKS", "ClientData", "Task", "register_task", "task_for"]


def task_for(cfg: Config) -> Task:
    """The task named by ``data.name`` (``synthetic``) or, for real data, by its kind."""
    name = cfg.data.name
    if name not in TASKS:
        raise ConfigError(f"data.name: unknown data source {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](cfg)
