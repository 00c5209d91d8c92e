"""Every knob as a nested dataclass: defaults < YAML file < `key=value` overrides (lingua-style).

Unknown keys and values of the wrong type are errors that name the dotted key and what was
expected. The resolved config is written into each run directory (`save_config`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class InputError(ValueError):
    """The user gave something wrong (a flag, a config value, a file); the message names it and
    says what was expected. The CLI prints it in one line (exit status 2), not as a traceback."""


class ConfigError(InputError):
    """A config value is wrong; the message names the dotted key and what was expected."""


_DEPRECATIONS_SAID: set[str] = set()


def _deprecated(message: str) -> None:
    """Say a deprecation once per process (configs are built many times)."""
    if message not in _DEPRECATIONS_SAID:
        _DEPRECATIONS_SAID.add(message)
        import logging

        logging.getLogger(__name__).warning("deprecated: %s", message)


# NaN fails every comparison, so `x <= 0` lets it through: test what is wanted, finite included.
def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


@dataclass
class MemoryConfig:
    """One product-key memory layer per target layer (Lample et al. 2019; paper's Qwen retrofit)."""

    layers: list[int] = field(default_factory=lambda: [6, 12, 18])  # decoder layers to retrofit
    n_keys: int = 128  # half-keys per head; slots = n_keys ** 2
    heads: int = 4
    knn: int = 16  # rows read per head per token
    k_dim: int = 256  # query/key dim (split in two halves)
    v_dim: int | None = None  # value dim; None = the model's hidden size
    mode: Literal["additive", "replacement"] = "additive"  # MLP(x) + a*Mem(x), or Mem(x) alone
    scale_init: float = 0.01  # initial a in additive mode (learnable)
    gated: bool = True  # SiLU-gated value projection: W_o(mem * silu(W_g x))
    query_batchnorm: bool = False
    value_init_std: float | None = None  # None = v_dim ** -0.5
    value_lr: float = 2.0  # values have their own learning rate (SGD, Lin et al.)
    # How value tables live across ranks: whole on every rank (replicated), or split by rows or columns.
    sharding: Literal["replicated", "row", "column", "local"] = "replicated"
    parallel_size: int = 0  # ranks a row/column-sharded table is split over (replicated across groups); 0 = all
    seed: int = 0  # memory params are initialised from this seed, identically on every rank

    def __post_init__(self) -> None:
        if self.sharding == "local":  # the first spelling: "local" read as "this rank's part" to some
            _deprecated("memory.sharding='local' is now spelled 'replicated' (a whole table on every rank)")
            self.sharding = "replicated"

    @property
    def slots(self) -> int:
        return self.n_keys * self.n_keys

    def validate(self, prefix: str = "memory") -> None:
        def need(ok: bool, key: str, expected: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: expected {expected}, got {got!r}")

        need(len(self.layers) > 0, "layers", "at least one target layer", self.layers)
        need(len(set(self.layers)) == len(self.layers), "layers", "distinct layer indices", self.layers)
        need(self.n_keys >= 1, "n_keys", "an integer >= 1", self.n_keys)
        need(self.heads >= 1, "heads", "an integer >= 1", self.heads)
        need(1 <= self.knn <= self.n_keys, "knn", f"1 <= knn <= n_keys (= {self.n_keys})", self.knn)
        need(self.k_dim >= 2 and self.k_dim % 2 == 0, "k_dim", "an even integer >= 2", self.k_dim)
        need(self.v_dim is None or self.v_dim >= 1, "v_dim", "None or an integer >= 1", self.v_dim)
        need(self.value_init_std is None or _non_negative(self.value_init_std), "value_init_std",
             "None or a finite number >= 0", self.value_init_std)
        need(_positive(self.value_lr), "value_lr", "a positive learning rate", self.value_lr)
        need(math.isfinite(self.scale_init), "scale_init", "a finite number", self.scale_init)
        need(self.mode in ("additive", "replacement"), "mode", "'additive' or 'replacement'", self.mode)
        need(self.sharding in ("replicated", "row", "column"), "sharding", "'replicated', 'row' or 'column'",
             self.sharding)
        need(self.parallel_size >= 0, "parallel_size", "0 (all ranks) or a positive number of ranks",
             self.parallel_size)


SCORING_RULES = ("tfidf", "kl", "tf", "random", "dense-accessed", "dense-all")
RULES_NEEDING_BACKGROUND = ("tfidf", "kl")


def background_needed(scoring: str) -> "ConfigError":
    """The error for a scoring rule that needs background stats when the run has none."""
    return ConfigError(f"sparse.scoring={scoring!r} needs background statistics: set sparse.background to a file "
                       f"made by `smf-ds background` (or run it into this out_dir first), or use 'tf' or 'random'")


@dataclass
class SparseConfig:
    """Which value rows train each optimizer step, and how (Lin et al. 2025)."""

    scoring: Literal["tfidf", "kl", "tf", "random", "dense-accessed", "dense-all"] = "tfidf"
    top_t: int = 512  # rows per memory table per optimizer step (clamped to the table size, with a warning)
    background: str | None = None  # background stats file (smf-ds background); tfidf and kl need it
    # lr is memory.value_lr. adamw-dense: the paper's code (torch AdamW over the whole table, fed
    # the masked gradient): every row's moments and weights move every step, selected or not.
    optimizer: Literal["sgd", "adam", "adamw", "adamw-dense"] = "sgd"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # adamw: applied to a row only in steps that select it; adamw-dense: to every row
    max_grad_norm: float = 0.0  # clip of the value-row gradients (their own clip); 0 = off
    kl_eps: float = 1e-8
    seed: int = 0  # for the `random` rule
    # step: top-t once per optimizer step over all micro-batches and ranks. micro_batch: the paper's
    # code: top-t of each micro-batch of each rank, the gradients of those rows summed (up to
    # micro-batches x ranks x top_t rows change per step; replicated tables only).
    select_every: Literal["step", "micro_batch"] = "step"
    count_padding: bool = False  # the paper's code: padded tokens' reads count towards selection

    def validate(self, prefix: str = "sparse") -> None:
        if self.top_t <= 0:
            raise ConfigError(f"{prefix}.top_t: expected a positive number of rows per step, got {self.top_t}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: expected two numbers in [0, 1), got {self.betas}")
        for key in ("eps", "kl_eps"):
            if not _positive(getattr(self, key)):
                raise ConfigError(f"{prefix}.{key}: expected a positive number, got {getattr(self, key)}")
        if not (_non_negative(self.weight_decay) and _non_negative(self.max_grad_norm)):
            raise ConfigError(f"{prefix}.weight_decay / {prefix}.max_grad_norm: expected >= 0, "
                              f"got {self.weight_decay} / {self.max_grad_norm}")
        if self.weight_decay > 0 and self.optimizer not in ("adamw", "adamw-dense"):
            raise ConfigError(f"{prefix}.weight_decay: only the adamw optimizer decays (and adamw-dense); "
                              f"got optimizer={self.optimizer!r} with weight_decay={self.weight_decay}")


@dataclass
class ModelConfig:
    name_or_path: str = ""  # HF hub id or local directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self, prefix: str = "model") -> None:
        # fp16 training needs loss scaling, and the memory values' gradients (taken outside the
        # DeepSpeed optimizer) would then arrive scaled: not supported rather than silently wrong.
        if self.dtype == "float16":
            raise ConfigError(f"{prefix}.dtype: float16 training needs loss scaling, which smf-ds does not "
                              f"do; use bfloat16 or float32 (`smf-ds eval --dtype float16` is fine)")


@dataclass
class TrainConfig:
    method: Literal["smf", "lora", "full"] = "smf"
    scope: Literal["values", "memory", "memory+scale"] = "values"  # what trains with method=smf
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # per rank
    grad_accum: int = 1
    lr: float = 1e-4  # dense parameters (LoRA, full finetuning, memory params); values use memory.value_lr
    # Both learning rates (train.lr and memory.value_lr) follow it: linear warm-up from 0 over
    # warmup_steps (Hugging Face's: the first step at lr 0), then constant or cosine decay to 0 at train.steps.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    # Gradients over grad_accum micro-batches: their mean (the engine's convention) or their sum
    # (the paper's code).
    accum_reduction: Literal["mean", "sum"] = "mean"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # dense parameters
    max_length: int = 256
    zero_stage: int = 0  # 0-3, for the dense parameters
    offload: bool = False  # ZeRO-3 offload of optimizer state and parameters to CPU (needs zero_stage=3)
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 0  # the newest this many checkpoints are kept, older ones removed; 0 = all
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])

    def validate(self, prefix: str = "train") -> None:
        for key in ("steps", "micro_batch_size", "grad_accum", "max_length", "lora_r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload and self.zero_stage != 3:  # ds_configs/ has an offload template for ZeRO-3 only
            raise ConfigError(f"{prefix}.offload: needs {prefix}.zero_stage=3, got zero_stage={self.zero_stage}")
        if not _positive(self.lr):
            raise ConfigError(f"{prefix}.lr: expected a positive learning rate, got {self.lr}")
        for key in ("weight_decay", "max_grad_norm"):
            if not _non_negative(getattr(self, key)):
                raise ConfigError(f"{prefix}.{key}: expected a finite number >= 0, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps: expected an integer >= 0, got {self.warmup_steps}")
        if self.log_every < 1:  # the loop logs when step % log_every == 0
            raise ConfigError(f"{prefix}.log_every: expected an integer >= 1, got {self.log_every}")
        if self.save_every < 0:
            raise ConfigError(f"{prefix}.save_every: expected an integer >= 0 (0 = only at the end), "
                              f"got {self.save_every}")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"{prefix}.keep_checkpoints: expected an integer >= 0 (0 = keep all), "
                              f"got {self.keep_checkpoints}")
        if not 0 <= self.lora_dropout < 1:  # also rejects NaN
            raise ConfigError(f"{prefix}.lora_dropout: expected a probability in [0, 1), got {self.lora_dropout}")


@dataclass
class DataConfig:
    train: str = ""  # MedMCQA-schema hub id or local file/dir: the task learned
    train_split: str = "train"  # of a hub id or save_to_disk dir (evaluation reads validation)
    background: str = ""  # OASST1-schema hub id or local file/dir: general text (background stats)
    train_limit: int | None = None
    background_batches: int = 2000  # B; a background batch has the training global batch's size
    # What a background df counts: the background batches that read a row (Lin et al.), or the
    # documents that read it (the paper's code: B is then background_batches x the global batch's
    # documents, each read on its own; one process only).
    background_unit: Literal["batch", "document"] = "batch"
    seed: int = 0
    # What the model learns to write after the MedMCQA prompt ({letter}, {option}); the paper's
    # " {letter}. {option}" by default. Evaluate with the same (smf-ds eval --answer-continuation).
    answer_continuation: str = " {letter}. {option}"
    # Append the row's explanation (exp) to the training answer, as MedMCQA provides one. Off when
    # the explanation only restates the answer: its easy, copyable tokens then dilute the loss.
    train_explanation: bool = True
    # What the training loss is taken on: the answer (and end-of-text), or every token of prompt and
    # answer (the paper's code).
    loss_on: Literal["answer", "all"] = "answer"

    def validate(self, prefix: str = "data") -> None:
        # None = every row; 0 rows would only fail later as "no usable row"
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError(f"{prefix}.train_limit: expected None (every row) or an integer >= 1, "
                              f"got {self.train_limit}")
        if self.background_batches < 1:
            raise ConfigError(f"{prefix}.background_batches: expected an integer >= 1, got {self.background_batches}")


@dataclass
class RetrofitConfig:
    """`smf-ds retrofit`: the dense warm-up of freshly injected memory on general text, before
    background statistics and the sparse phase (the paper's code: memory params only, AdamW,
    lr 5e-4, chat text). Every value row trains every step; the backbone stays frozen."""

    data: str = ""  # OASST1-schema hub id or local file/dir; '' = data.background
    steps: int = 1000
    lr: float = 5e-4  # query, keys, gate/out projections (and the scale with scope memory+scale)
    value_lr: float | None = None  # the value rows; None = lr
    value_optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    scope: Literal["memory", "memory+scale"] = "memory+scale"

    def validate(self, prefix: str = "retrofit") -> None:
        if self.steps < 1:
            raise ConfigError(f"{prefix}.steps: expected an integer >= 1, got {self.steps}")
        for key in ("lr", "value_lr"):
            value = getattr(self, key)
            if value is not None and not _positive(value):
                raise ConfigError(f"{prefix}.{key}: expected a positive learning rate, got {value}")


STOPPABLE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass
class ClusterConfig:
    """Life on a cluster: stopping on a scheduler's signal, and peers that die or hang."""

    # Any rank getting one of these stops the run at the next optimizer-step boundary, saved
    # (smf_ds.train.stop); slurm sends SIGTERM at the time limit (and --signal=B:USR1@T before).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Seconds a collective may wait for a peer, and after which a silent peer counts as lost
    # (smf_ds.parallel.watchdog): every rank then exits non-zero, naming it.
    collective_timeout: float = 600.0

    def validate(self, prefix: str = "cluster") -> None:
        bad = [s for s in self.stop_signals if s not in STOPPABLE_SIGNALS]
        if bad:
            raise ConfigError(f"{prefix}.stop_signals: expected names from {list(STOPPABLE_SIGNALS)}, got {bad}")
        if not _positive(self.collective_timeout):
            raise ConfigError(f"{prefix}.collective_timeout: expected a positive number of seconds, "
                              f"got {self.collective_timeout}")


@dataclass
class SMFConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrofit: RetrofitConfig = field(default_factory=RetrofitConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    out_dir: str = "runs/default"


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts with checked types.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass(frozen=True)
class _Override:
    """A `key=value` override: the raw text, and the text parsed as YAML."""

    raw: str
    parsed: Any


def _wants_text(tp: Any, value: _Override) -> bool:
    """A string field takes an override's raw text (`data.train=on` stays 'on', not True)."""
    if tp is str:
        return True
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    return str in options and value.parsed is not None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, _Override):
        value = value.raw if _wants_text(tp, value) else value.parsed
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # tuple[X, ...]: a list in YAML
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, f"{key} (a key)"): _coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as text: take what float() takes
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; an unknown key is an error naming it."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown config key '{dotted}'; known keys here: {sorted(known)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten_dotted(tree: dict, prefix: str = "") -> dict:
    """Nested mappings as {dotted key: leaf} (train.lr, run.model.name_or_path), so that a
    difference between two configs names its leaf; an empty mapping is a leaf."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config that sets one twice is a mistake to name."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as err:  # its own message names only "<unicode string>"
        raise ConfigError(f"{where}: not valid YAML ({err})") from None


def _override_tree(overrides: list[str]) -> dict:
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. memory.knn=32")
        key, raw = item.split("=", 1)
        parsed = _load_yaml(raw, f"override '{item}'") if raw.strip() else None
        _set_dotted(data, key.strip(), _Override(raw.strip(), parsed))
    return data


def _parsed(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _parsed(v) for k, v in node.items()}
    return node.parsed if isinstance(node, _Override) else node


def parse_overrides(overrides: list[str]) -> dict:
    """['memory.knn=32', 'memory.layers=[1,2]'] -> nested dict; values are parsed as YAML
    (load_config keeps the raw text for string fields)."""
    return _parsed(_override_tree(overrides))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = SMFConfig) -> Any:
    """defaults < YAML file at `path` < `key=value` overrides; then validated."""
    data: dict = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        loaded = _load_yaml(path.read_text(), f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        try:
            data = _merge(data, loaded)
            cfg = from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
    data = _merge(data, _override_tree(overrides or []))
    cfg = from_dict(cls, data)
    validate(cfg)
    return cfg


def validate(cfg: Any, prefix: str = "") -> None:
    """Call `validate(prefix)` on every nested section that has one."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            if hasattr(value, "validate"):
                value.validate(dotted)
            validate(value, dotted)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
