"""Training on the tasks of ``attnmem.tasks``: the loop, checkpoints, sweeps, memory search.

``fit(TrainConfig(...))`` trains an ``attnmem.nn.Transformer`` on a task and reports accuracy,
loss, peak memory and tokens/s (``training.loop``); checkpoints are atomic and checksummed
(``training.checkpoint``); ``sweep`` trains several methods alike (``training.sweep``);
``max_batch_under`` finds the largest batch whose step fits a budget (``training.budget``).
"""

from __future__ import annotations

from ..tasks import IGNORE
from .budget import estimated_peak_fn, linear_peak_fn, max_batch_under, plan_config
from .checkpoint import load_checkpoint, save_atomic
from .loop import (
    CHECKPOINT,
    EVAL_SEED_OFFSET,
    MASK_WINDOW,
    METRICS,
    TaskModel,
    TrainConfig,
    TrainResult,
    build,
    evaluate,
    fit,
    loss_and_correct,
    resume_key,
    step_peak,
    training_loss,
)
from .sweep import markdown_table, sweep, write_sweep

__all__ = ["CHECKPOINT", "EVAL_SEED_OFFSET", "IGNORE", "MASK_WINDOW", "METRICS", "TaskModel", "TrainConfig",
           "TrainResult", "build", "estimated_peak_fn", "evaluate", "fit", "linear_peak_fn", "load_checkpoint",
           "loss_and_correct", "markdown_table", "max_batch_under", "plan_config", "resume_key", "save_atomic",
           "step_peak", "sweep", "training_loss", "write_sweep"]
