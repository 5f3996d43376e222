"""Train several layouts in one process group and probe one step of each; launched by tests/test_planner.py.

usage: torchrun ... tests/planner_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case name": [hydra overrides...], ...}. For every case rank 0 saves OUT_DIR/<name>.pt:
per rank, its pipeline and FSDP position, the bytes of its model states, the peak bytes saved
for backward and the step's communication per mesh dim (lightning_3d.bench.planner_proof).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from case_harness import run_cases

from lightning_3d.bench.planner_proof import measure_layout


def run_case(name: str, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    return measure_layout(out_dir, overrides)


if __name__ == "__main__":
    run_cases(run_case)
