"""What the stand-in fits (stand_in.vae_fit, stand_in.text_fit) share: their optimizer loop and the atomic swap of a
fitted component into a saved pipeline folder."""

import shutil
from pathlib import Path
from typing import Callable, List

import torch

from utils.atomic import publish_dir


def fit_steps(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
              step_loss: Callable[[], torch.Tensor], steps: int, schedule=None) -> List[float]:
    """Train module for steps optimizer steps of step_loss() (a fresh batch each call); return each step's loss,
    leaving the module in eval mode."""
    module.train()
    losses = []
    for _ in range(steps):
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    module.eval()
    return losses


def replace_component(module, model_dir: Path, subfolder: str) -> Path:
    """Replace MODEL_DIR/subfolder with module's weights: written beside it, then swapped in as checkpoints are."""
    target = model_dir / subfolder
    partial = model_dir / f"{subfolder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    module.save_pretrained(partial, safe_serialization=True)
    publish_dir(partial, target)
    return target
