"""The training methods (peft's one class per tuner type): what each trains, whether it needs
memory and background statistics, and how it saves its artifact. `method_of(cfg)` is the only
place that reads `train.method`; a new method is one class here and its name in `METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import RULES_NEEDING_BACKGROUND, ConfigError, SMFConfig


@dataclass(frozen=True)
class Start:
    """What a run starts from: a model (hub id or directory) and, for SMF, a memory adapter on it."""
    model: str
    adapter: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    artifact: str  # what a run leaves in its out_dir
    uses_memory: bool = False  # memory injected; its value rows train through the SMF updater

    def needs_background(self, cfg: SMFConfig) -> bool:
        """Whether the run's scoring rule reads background statistics."""
        return self.uses_memory and cfg.sparse.scoring in RULES_NEEDING_BACKGROUND

    def trainable(self, model: nn.Module, cfg: SMFConfig) -> tuple[nn.Module, list[nn.Parameter]]:
        """The (possibly wrapped) model and its dense trainable parameters."""
        raise NotImplementedError

    def continued(self, start: Start, artifact: Path, workdir: Path) -> Start:
        """Where a run that goes on from this run's result starts (continual learning): here, the
        model directory the run saved."""
        return Start(str(artifact))

    def save_artifact(self, model: nn.Module, tokenizer, target: Path) -> None:
        """Every rank calls it (gathers are collectives); rank 0 writes."""
        from ..parallel.collective import gathered_parameters
        from ..parallel.process_group import get_rank

        with gathered_parameters(list(model.parameters())):  # whole, even if ZeRO-3 partitioned them
            if get_rank() == 0:
                model.save_pretrained(str(target))
                tokenizer.save_pretrained(str(target))


class SMF(Method):
    def trainable(self, model, cfg):
        from ..memory.inject import set_train_scope

        return model, set_train_scope(model, cfg.train.scope)

    def save_artifact(self, model, tokenizer, target):
        from ..memory.adapter import save_memory_adapter
        from ..parallel.collective import process_collective

        # It gathers its own ZeRO-3 parameters (DeepSpeed refuses nested gathers); a collective for
        # sharded tables; rank 0 writes.
        save_memory_adapter(model, target, process_collective())

    def continued(self, start, artifact, workdir):
        return Start(start.model, str(artifact))  # the same backbone; the memory as this run left it


class LoRA(Method):
    def trainable(self, model, cfg):
        from peft import LoraConfig, get_peft_model

        t = cfg.train
        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=list(t.lora_targets), task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:  # peft: no module matches the targets
            raise ConfigError(f"train.lora_targets={list(t.lora_targets)}: {err}") from None
        return model, [p for p in model.parameters() if p.requires_grad]

    def continued(self, start, artifact, workdir):
        """The adapter merged into its model, saved to workdir: the next run adds a new adapter."""
        from peft import PeftModel

        from ..models import load_model_and_tokenizer
        from ..parallel.process_group import barrier, get_rank

        if get_rank() == 0 and not workdir.is_dir():
            # float32 on the CPU: a bf16 merge would round the whole backbone at every stage
            model, tokenizer = load_model_and_tokenizer(start.model, dtype="float32", device="cpu")
            merged = PeftModel.from_pretrained(model, str(artifact)).merge_and_unload()
            partial = workdir.with_name(workdir.name + ".partial")  # renamed whole: a cut-off save is redone
            merged.save_pretrained(str(partial))
            tokenizer.save_pretrained(str(partial))
            partial.rename(workdir)
        barrier()
        return Start(str(workdir))


class Full(Method):
    def trainable(self, model, cfg):
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.parameters())


METHODS: dict[str, Method] = {m.name: m for m in (SMF("smf", "memory_adapter", uses_memory=True),
                                                  LoRA("lora", "lora_adapter"), Full("full", "model"))}


def method_of(cfg: SMFConfig) -> Method:
    try:
        return METHODS[cfg.train.method]
    except KeyError:
        raise ConfigError(f"train.method: expected one of {list(METHODS)}, got {cfg.train.method!r}") from None
