"""The DeepSpeed JSON is generated from the one run config (gpt-neox style), never hand-edited.

Templates in ds_configs/ fix the structure per ZeRO stage; every "auto" is filled from the run
config here. The filled dict goes straight to deepspeed.initialize (it is not written to disk;
the run directory's config.yaml holds the values it was filled from).

The templates live at the top of the source tree; setup.py also installs them under
<prefix>/share/smf-ds/ds_configs, where a non-editable install finds them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import SMFConfig


def template_dirs() -> list[Path]:
    """Where templates are looked for, in order: the source tree (a checkout or an editable
    install), then the copy a regular install puts under sys.prefix."""
    return [Path(__file__).resolve().parents[2] / "ds_configs", Path(sys.prefix) / "share" / "smf-ds" / "ds_configs"]


def template_name(stage: int, offload: bool) -> str:
    return f"zero{stage}_offload.json" if offload else f"zero{stage}.json"


def template_path(stage: int, offload: bool) -> Path:
    """The first template found in `template_dirs()`; FileNotFoundError lists every place looked."""
    name = template_name(stage, offload)
    tried = [d / name for d in template_dirs()]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"train.zero_stage={stage}, train.offload={offload}: no DeepSpeed template {name}; "
                            f"looked in {', '.join(str(p.parent) for p in tried)}")


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
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "bf16.enabled": cfg.model.dtype == "bfloat16",
    }
    return _fill(json.loads(path.read_text()), values)
