"""Logger ``tensorboard``: scalar event files under <run>/tensorboard (on by default)."""
from __future__ import annotations

from pathlib import Path

import rlbench


@rlbench.hookimpl
def rlbench_loggers():
    return {"tensorboard": "rlbench.plugins.loggers.tensorboard:TensorBoardLogger"}


class TensorBoardLogger:
    def __init__(self, run_dir, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
