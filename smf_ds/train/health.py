"""Model health, checked before anything is saved.

Before each checkpoint and before the artifact: the trained tensors (dense parameters, value
tables, optimizer state) must be finite, and a forward pass of the step's first micro-batch with
the new weights must give a finite loss (weights of 1e10 are finite, but the next forward is
not). An unhealthy model stops the run (UnhealthyModelError, exit 2) with the setting that most
likely caused it and the newest checkpoint whose tensors are all finite, checked by reading it;
nothing of the unhealthy state is saved or marked latest.

Two states are healthy to the arithmetic but useless, and are flagged instead (the log,
TensorBoard `health/*`, and the summary's "healthy": false with the reasons): a loss that went
to ln(vocab size), the loss of a uniform output; and value rows past VALUE_BOUND in size.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..config import InputError

log = logging.getLogger(__name__)

VALUE_BOUND = 1e6  # |value| past this is exploded: initial values are ~ v_dim ** -0.5
UNIFORM_MARGIN = 0.01  # a loss within 1% of ln(vocab) is a uniform output


class UnhealthyModelError(InputError):
    """The model went non-finite; nothing of it was saved. The message says what and why."""


def _partition(param: torch.nn.Parameter) -> torch.Tensor:
    return getattr(param, "ds_tensor", param)  # this rank's part under ZeRO-3


def nonfinite_tensors(model, tables, updater) -> list[str]:
    """Names of this rank's trained tensors that hold a NaN or an infinity."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(_partition(p)).all()]
    bad += [f"memory layer {layer}'s value table" for layer, table in tables
            if not torch.isfinite(table.local_weight).all()]
    if updater is not None:
        bad += [f"sparse optimizer state {key}" for key, value in updater.state_dict().items()
                if value.is_floating_point() and not torch.isfinite(value).all()]
    return bad


def likely_cause(cfg) -> str:
    from .methods import method_of

    t, memory = cfg.train, method_of(cfg).uses_memory
    settings = [f"memory.value_lr={cfg.memory.value_lr}"] if memory else []
    if not memory or t.scope != "values":  # dense parameters train too
        settings.insert(0, f"train.lr={t.lr}")
    return f"a learning rate too large ({' or '.join(settings)})"


def checkpoint_is_finite(checkpoint: Path) -> bool:
    """Every floating tensor in the checkpoint's safetensors and torch files is finite."""
    from safetensors.torch import load_file

    def finite(obj) -> bool:
        if torch.is_tensor(obj):
            return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        if isinstance(obj, dict):
            return all(finite(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return all(finite(v) for v in obj)
        return True

    try:
        for file in sorted(checkpoint.glob("*.safetensors")):
            if not finite(load_file(str(file))):
                return False
        for file in sorted(checkpoint.glob("*.pt")):
            if not finite(torch.load(file, map_location="cpu", weights_only=False)):
                return False
    except Exception:  # noqa: BLE001 - unreadable is not healthy
        return False
    return True


def last_healthy_checkpoint(directory: Path, complete_tags) -> Path | None:
    for tag in reversed(complete_tags(directory)):
        if checkpoint_is_finite(directory / tag):
            return directory / tag
    return None


def flags(losses: list[float], vocab_size: int | None, tables) -> list[str]:
    """Reasons the run, though finite, is not healthy ([] when none)."""
    reasons = []
    if vocab_size and len(losses) >= 2:
        uniform = math.log(vocab_size)
        if abs(losses[-1] - uniform) <= UNIFORM_MARGIN * uniform and losses[0] < (1 - 5 * UNIFORM_MARGIN) * uniform:
            reasons.append(f"the loss went from {losses[0]:.4g} to {losses[-1]:.4g} = ln(vocab size {vocab_size}): "
                           f"the model outputs a uniform distribution")
    for layer, table in tables:
        peak = float(table.local_weight.detach().abs().max()) if table.local_weight.numel() else 0.0
        if not peak <= VALUE_BOUND:
            reasons.append(f"memory layer {layer}'s value rows reach {peak:.3g} (past {VALUE_BOUND:g}): exploded")
    return reasons
