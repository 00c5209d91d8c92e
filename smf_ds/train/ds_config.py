"""The DeepSpeed JSON is generated from the one run config (gpt-neox style), never hand-edited.

Templates in ds_configs/ fix the structure per ZeRO stage; every "auto" is filled from the run
config here, and the filled JSON is written into the run directory for the record.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import SMFConfig

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def template_path(stage: int, offload: bool) -> Path:
    return TEMPLATE_DIR / (f"zero{stage}_offload.json" if offload else f"zero{stage}.json")


def _fill(node, values: dict, path: str = ""):
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise KeyError(f"DeepSpeed template: no run-config value for '{path}'")
        return values[path]
    return node


def build_ds_config(cfg: SMFConfig) -> dict:
    t = cfg.train
    path = template_path(t.zero_stage, t.offload)
    if not path.is_file():
        raise FileNotFoundError(f"train.zero_stage={t.zero_stage}, train.offload={t.offload}: "
                                f"no DeepSpeed template {path}")
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "bf16.enabled": cfg.model.dtype == "bfloat16",
    }
    return _fill(json.loads(path.read_text()), values)
