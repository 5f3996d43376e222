"""The pieces the strategy runs, one job per file, each called from one Lightning hook.

- :mod:`.pipeline`: ``PipelineRunner`` / ``PipelinedModel`` — runs the pipeline schedule where a step calls the model.
- :mod:`.step_guard`: ``StepGuard`` — partial-gradient reduce, agreed non-finite check, clipping.
- :mod:`.checkpointer`: ``Checkpointer`` — DCP save / load / async / remove, RNG, layout.
- :mod:`.faults`: ``FaultMonitor`` — process-group bootstrap, heartbeat, timeouts, NCCL settings.
- :mod:`.parallelized`: ``Parallelized`` — what a parallelized module keeps for later runs.
- :mod:`.sync`: ``Collectives`` — barrier, broadcast, and what a logged value or metric is reduced over.
- :mod:`.stop_signal`: ``StopSignal`` — SIGTERM noted by the handler, agreed on in the step check.
"""

from lightning_3d.runtime.checkpointer import Checkpointer, layout_of
from lightning_3d.runtime.faults import FaultMonitor
from lightning_3d.runtime.parallelized import Parallelized, parallelized, wire_model_call
from lightning_3d.runtime.pipeline import PipelinedModel, PipelineRunner, tied_stage_group, tied_stage_weights
from lightning_3d.runtime.step_guard import StepGuard, clip_reads_gradients_first
from lightning_3d.runtime.stop_signal import StopSignal
from lightning_3d.runtime.sync import Collectives

__all__ = [
    "Checkpointer",
    "Collectives",
    "FaultMonitor",
    "PipelineRunner",
    "PipelinedModel",
    "Parallelized",
    "StepGuard",
    "StopSignal",
    "clip_reads_gradients_first",
    "layout_of",
    "parallelized",
    "tied_stage_group",
    "tied_stage_weights",
    "wire_model_call",
]
