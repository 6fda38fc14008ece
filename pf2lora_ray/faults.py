"""Fault injection for testing recovery (off by default).

``faults.crash_driver_at_round=R`` ends the driver process abruptly with status
:data:`CRASH_EXIT_CODE` right after round R's results and checkpoint are on disk,
the way a killed driver would: no clean-up runs, runs.parquet still says
"running". ``pf2lora run ... --resume`` then continues from that checkpoint.
(``faults.kill_actor_at_round`` is handled by the Ray backend, which owns actors.)
"""

from __future__ import annotations

import os
import sys

from pf2lora_ray.config import Config
from pf2lora_ray.driver import DriverState, RoundReport

CRASH_EXIT_CODE = 75


class DriverCrash:
    """Callback placed after the results writer and the checkpoint writer."""

    def __init__(self, cfg: Config) -> None:
        self.round = cfg.faults.crash_driver_at_round

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        if report.round == self.round:
            print(f"faults: crashing the driver after round {report.round}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)

    def on_end(self, state: DriverState, status: str) -> None:
        pass
