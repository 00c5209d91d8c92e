"""The dense parameters' state, whole, beside a ZeRO 1-3 checkpoint: so that it resumes on another
number of processes.

DeepSpeed 0.19.8 loads a ZeRO 1-3 checkpoint only on the data-parallel size that wrote it ("Automatic
adjustment of ZeRO's optimizer state partitioning with a new world size is not currently
supported"), and its universal checkpoint conversion needs information a Megatron-style client
adds. So each checkpoint also holds `dense_full.safetensors` (rank 0 writes it; every rank takes
part in gathering): every trainable dense parameter's fp32 value and AdamW moments, whole, and the
optimizer's step count. On another world size the engine is left as built and this state is
written into it through DeepSpeed's tensor-fragment API, each rank keeping its own partition.
ZeRO-0 checkpoints hold whole state already and load on any world size.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError
from ..parallel.process_group import barrier, get_rank

FILE = "dense_full.safetensors"  # dense_full.safetensors, or dense_full-NNNNN.safetensors parts when large
PART_BYTES = 2 << 30  # rank 0 holds at most this much of the gathered state before writing a part
MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_stage(engine) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    return stage() if callable(stage) else 0


def needs_dense_file(engine) -> bool:
    """Whether this engine's checkpoints need dense_full to load on another world size."""
    return _zero_stage(engine) > 0


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _base_optimizer_states(engine) -> list[dict]:
    return [st for st in _base_optimizer(engine).state.values() if "step" in st]


def _materialize_optimizer_state(engine) -> None:
    """AdamW creates its state at its first step, and DeepSpeed links it to the parameters then: a
    resumed engine that has not stepped gets it now (zeros, overwritten next), and linked."""
    base = _base_optimizer(engine)
    # The fp32 partitions the base optimizer steps (ZeRO-3 puts them in its param groups only
    # while it steps; ZeRO 1-2 keeps them there).
    partitions = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
                  or getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
                  or [p for group in base.param_groups for p in group["params"]])
    fused_like = any(group.get("fused") or group.get("capturable") for group in base.param_groups)
    for p in partitions:
        state = base.state[p]
        state.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device if fused_like else "cpu"))
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1-2
    if link is not None:
        link()


def _set_full(param, value: torch.Tensor, key: str | None) -> None:
    """This rank's partition of `param`'s fp32 value (key None) or optimizer state `key`, from the
    whole tensor. DeepSpeed's own ZeRO-3 setter reads past the end of a parameter smaller than the
    ranks' padded partitions (a 1-element scale on 2 ranks): this one pads."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not hasattr(param, "ds_id"):
        if key is None:
            safe_set_full_fp32_param(param, value.to(param.device))
        else:
            safe_set_full_optimizer_state(param, value.to(param.device), key)
        return
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True, optim_state_key=key)
    size, rank = part.numel(), optimizer._get_param_partition_rank(param)
    padded = torch.zeros(size * (rank + 1), dtype=part.dtype)
    flat = value.flatten().to(part.dtype)[:padded.numel()]
    padded[:flat.numel()] = flat
    part.data.copy_(padded[size * rank:].view_as(part).to(part.device))


def save_dense_state(engine, checkpoint: Path) -> None:
    """Every rank: gather each trainable parameter's fp32 value and moments; rank 0 writes them."""
    if not needs_dense_file(engine):
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors: dict[str, torch.Tensor] = {}
    parts, held = 0, 0
    for name, param in _trainable(engine):  # the same order on every rank: ZeRO-3 gathers are collectives
        value = safe_get_full_fp32_param(param)
        moments = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
        if get_rank() == 0:
            tensors[f"param.{name}"] = value.detach().float().cpu().contiguous()
            for key, moment in moments.items():
                tensors[f"{key}.{name}"] = moment.detach().float().cpu().contiguous()
            held += 3 * value.numel() * 4
            if held >= PART_BYTES:  # a large model's state goes out in parts, not all in rank 0's memory
                _write_part(checkpoint, parts, tensors)
                tensors, held, parts = {}, 0, parts + 1
    if get_rank() == 0:
        steps = {float(st["step"]) for st in _base_optimizer_states(engine)}
        meta = {"optimizer_step": str(int(max(steps, default=0))), "global_steps": str(engine.global_steps),
                "global_samples": str(engine.global_samples)}
        if parts and tensors:
            _write_part(checkpoint, parts, tensors)
            tensors, parts = {}, parts + 1
        tmp = checkpoint / f".{FILE}.tmp"  # the whole state, or (parts written) the metadata alone
        save_file(tensors, str(tmp), metadata={**meta, "parts": str(parts)})
        os.replace(tmp, checkpoint / FILE)
    barrier()


def _write_part(checkpoint: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    name = f"{FILE[:-len('.safetensors')]}-{index:05d}.safetensors"
    save_file(tensors, str(checkpoint / f".{name}.tmp"))
    os.replace(checkpoint / f".{name}.tmp", checkpoint / name)


def _saved_tensors(checkpoint: Path) -> dict[str, tuple[Path, str]]:
    """Every saved tensor's name -> (file, key), over the state file or its parts (read lazily)."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob(f"{FILE[:-len('.safetensors')]}-*.safetensors")) or [checkpoint / FILE]
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({key: (file, key) for key in f.keys()})
    return where


def load_dense_state(engine, checkpoint: Path, grad_accum: int) -> None:
    """Write the whole state saved in `checkpoint` into this engine's partitions (every rank)."""
    from safetensors import safe_open

    from ..parallel.collective import gathered_parameters

    file = checkpoint / FILE
    if not file.is_file():
        raise ConfigError(f"resume: {file} not found: this ZeRO checkpoint resumes only on the number of processes "
                          f"that wrote it (run.json: processes)")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    where = _saved_tensors(checkpoint)
    _materialize_optimizer_state(engine)
    trainable = _trainable(engine)
    missing = [name for name, _ in trainable if f"param.{name}" not in where]
    if missing:
        raise ConfigError(f"resume: {file}: no saved state for {missing[:4]}; the model's trainable parameters differ")

    def saved(key: str) -> torch.Tensor:  # one tensor at a time: no rank holds the whole state
        path, name = where[key]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    for name, param in trainable:
        value = saved(f"param.{name}")
        _set_full(param, value, None)
        for key in MOMENTS:
            _set_full(param, saved(f"{key}.{name}"), key)
        with torch.no_grad(), gathered_parameters([param], modifier_rank=0):  # the module's own copy
            if not hasattr(param, "ds_id") or get_rank() == 0:
                param.data.copy_(value.to(param.dtype).view_as(param.data))
    step = int(meta.get("optimizer_step", 0))
    for st in _base_optimizer_states(engine):
        st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step
    engine.global_steps = int(meta.get("global_steps", step))
    engine.global_samples = int(meta.get("global_samples", 0))
    engine.micro_steps = engine.global_steps * grad_accum
