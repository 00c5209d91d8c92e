"""The engine that trains the dense parameters: DeepSpeed when any dense parameter trains.

SMF on value rows alone has no dense parameter, and DeepSpeed refuses to run backward without
an optimizer; `ValuesOnlyEngine` then stands in with the same few calls (forward, backward with
the 1/grad_accum loss scale DeepSpeed applies, step, checkpoint) so the loop has one shape.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import time
from pathlib import Path

import torch
from torch import nn

from ..parallel.process_group import get_rank, unlink_deepspeed_shared_memory

log = logging.getLogger(__name__)

# DeepSpeed builds its ops (CPU all-reduce, fused or CPU Adam) the first time it needs them, in a
# minute or two; after this long its set-up is more likely waiting on a lock nobody will release.
BUILD_LOCK_WARNING_S = 180.0


class ValuesOnlyEngine:
    def __init__(self, model: nn.Module, grad_accum: int) -> None:
        self.module = model
        self.grad_accum = grad_accum
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, **batch):
        return self.module(**batch)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.grad_accum if scale_wrt_gas else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.global_steps += 1

    def save_checkpoint(self, directory: str, tag: str, client_state: dict,
                        exclude_frozen_parameters: bool = True) -> None:  # it holds no parameter
        if get_rank() == 0:
            path = Path(directory) / tag
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"client_state": client_state, "global_steps": self.global_steps}, path / "engine_state.pt")

    def load_checkpoint(self, directory: str, tag: str, load_module_strict: bool = True):
        state = torch.load(Path(directory) / tag / "engine_state.pt", weights_only=False)
        self.global_steps = state["global_steps"]
        self.micro_steps = self.global_steps * self.grad_accum
        return str(Path(directory) / tag), state["client_state"]


def build_engine(model: nn.Module, params: list[nn.Parameter], ds_config: dict, grad_accum: int):
    """DeepSpeed over `params` (ZeRO as configured), or ValuesOnlyEngine when `params` is empty."""
    if not params:
        return ValuesOnlyEngine(model, grad_accum)
    import deepspeed

    watch = warn_of_build_locks_after(BUILD_LOCK_WARNING_S)
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    finally:
        watch.cancel()
    unlink_deepspeed_shared_memory()
    _exclude_frozen_tied_aliases(engine)
    return engine


def warn_of_build_locks_after(seconds: float) -> threading.Timer:
    """A timer that, unless cancelled within `seconds`, names the op-build locks under torch's
    extensions folder. torch builds an op under a lock file and waits, silently and for ever, while
    one exists: a process killed mid-build (a preemption on a job's first run) leaves its lock, and
    every later run on that machine hangs in DeepSpeed's set-up."""
    def warn() -> None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR")  # as torch reads it: set, even empty, it is the root
        root = get_default_build_root() if root is None else root
        locks = sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")))
        aged = []
        for lock in locks:
            try:
                aged.append(f"{lock} ({(time.time() - os.path.getmtime(lock)) / 60:.0f} min old)")
            except FileNotFoundError:  # released meanwhile
                pass
        if aged:
            log.warning("rank %d: DeepSpeed's set-up has taken %.0f s and op-build locks exist: %s. A build "
                        "killed midway leaves its lock and every later run waits on it for ever: if no other "
                        "process on this machine is building, delete them.", get_rank(), seconds, ", ".join(aged))

    timer = threading.Timer(seconds, warn)
    timer.daemon = True
    timer.start()
    return timer


def _exclude_frozen_tied_aliases(engine) -> None:
    """DeepSpeed's `exclude_frozen_parameters` drops the frozen names that `named_parameters()`
    lists, and that lists a tied weight once: its alias (`lm_head.weight`, tied to the input
    embeddings, 272 MB at Qwen2.5-0.5B's size) stayed in every checkpoint. Drop aliases too."""
    module_state_dict = engine.module_state_dict

    def without_frozen_aliases(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = module_state_dict(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = without_frozen_aliases


def release_engine(engine) -> None:
    """Let a finished run's model and optimizer state be freed. DeepSpeed keeps a ZeRO-3 model
    alive after its run in two module-level places: the top module that ZeRO-3 puts on
    FWD_MODULE_STACK and never takes off, and the unbounded `lru_cache` on the parameter
    coordinator's `__params_to_release(self, submodule, step)`, whose keys hold the coordinator and
    every submodule. An experiment that trains run after run in one process held every earlier
    ZeRO-3 run: at Qwen2.5-0.5B's size the third one ran out of memory."""
    if isinstance(engine, ValuesOnlyEngine):
        return
    engine.destroy()
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not engine.module]
    _clear_params_to_release_cache()


def _clear_params_to_release_cache() -> None:
    """Empty the coordinator's memo of which parameters each submodule releases (all engines'; a
    live engine just recomputes its entries). It sits under DeepSpeed's nvtx wrapper, so follow
    the wrapper's closure to the lru_cache."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fn = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for _ in range(4):  # a few wrappers deep at most
        if fn is None or hasattr(fn, "cache_clear"):
            break
        inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
        fn = inner[0] if inner else getattr(fn, "__wrapped__", None)
    if fn is not None and hasattr(fn, "cache_clear"):
        fn.cache_clear()
