"""Logger ``wandb``: Weights & Biases, only when listed in ``logging.loggers``.

``logging.wandb_mode`` (default ``offline``) is passed to ``wandb.init``; offline
runs are written under <run>/wandb and can be uploaded later with ``wandb sync``.
"""
from __future__ import annotations

from pathlib import Path

import rlbench


@rlbench.hookimpl
def rlbench_loggers():
    return {"wandb": "rlbench.plugins.loggers.wandb:WandbLogger"}


class WandbLogger:
    def __init__(self, run_dir, config):
        import wandb

        self.run = wandb.init(project=config.logging.wandb_project, name=config.run.name, dir=str(Path(run_dir)),
                              mode=config.logging.wandb_mode, config=config.to_dict(), reinit="finish_previous")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()
