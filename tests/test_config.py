"""Config: defaults < YAML < overrides; errors name the dotted key; save/load round trip."""
import dataclasses

import pytest

from smf_ds.config import (ConfigError, MemoryConfig, SMFConfig, SparseConfig, load_config, parse_overrides,
                           save_config)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == SMFConfig()
    assert cfg.memory.layers == [6, 12, 18] and cfg.memory.knn == 16 and cfg.sparse.scoring == "tfidf"


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, """
memory:
  knn: 8
  n_keys: 32
  layers: [1, 2]
sparse:
  top_t: 64
  scoring: kl
""")
    cfg = load_config(path)
    assert (cfg.memory.knn, cfg.memory.n_keys, cfg.memory.layers) == (8, 32, [1, 2])  # from YAML
    assert cfg.memory.heads == MemoryConfig().heads  # untouched: default
    assert (cfg.sparse.top_t, cfg.sparse.scoring) == (64, "kl")

    cfg = load_config(path, ["memory.knn=4", "memory.layers=[3]", "sparse.optimizer=adamw",
                             "memory.v_dim=64", "memory.value_init_std=1"])
    assert cfg.memory.knn == 4 and cfg.memory.layers == [3]  # override beats YAML
    assert cfg.memory.n_keys == 32 and cfg.sparse.top_t == 64  # YAML kept where not overridden
    assert cfg.sparse.optimizer == "adamw" and cfg.memory.v_dim == 64
    assert cfg.memory.value_init_std == 1.0 and isinstance(cfg.memory.value_init_std, float)  # int -> float

    # Overrides without a file apply on top of the defaults; null / empty set an optional to None.
    cfg = load_config(None, ["memory.v_dim=null", "sparse.background="])
    assert cfg.memory.v_dim is None and cfg.sparse.background is None
    assert cfg.memory.knn == MemoryConfig().knn


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == SMFConfig()


def test_a_key_set_twice_in_yaml_is_named(tmp_path):
    """PyYAML alone keeps the last value silently."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 3, steps: 4}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML \(key 'steps' appears twice .*line 1"):
        load_config(str(path))
    path.write_text("train:\n  steps: 3\nmemory: {knn: 4}\ntrain:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping \(first on line 1\)"):
        load_config(str(path))


def test_parse_overrides_nests_and_parses_yaml_values():
    assert parse_overrides(["memory.knn=32", "memory.layers=[1, 2]", "memory.gated=false", "out_dir=runs/x"]) == {
        "memory": {"knn": 32, "layers": [1, 2], "gated": False}, "out_dir": "runs/x"}
    with pytest.raises(ConfigError, match="override 'memory.knn': expected key=value"):
        parse_overrides(["memory.knn"])
    with pytest.raises(ConfigError, match=r"override 'memory.layers=\[1,2': not valid YAML"):
        parse_overrides(["memory.layers=[1,2"])
    with pytest.raises(ConfigError, match="override 'memory.knn.x': 'knn' is not a section"):
        parse_overrides(["memory.knn=3", "memory.knn.x=1"])


def test_unknown_key_names_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'memory\.knnn'"):
        load_config(None, ["memory.knnn=4"])
    path = write(tmp_path, "memory:\n  knnn: 4\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: unknown config key 'memory\.knnn'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'memroy'"):
        load_config(None, ["memroy.knn=4"])


@pytest.mark.parametrize("override,key", [
    ("memory.knn=abc", r"memory\.knn: expected an integer"),
    ("memory.knn=2.5", r"memory\.knn: expected an integer"),
    ("memory.knn=true", r"memory\.knn: expected an integer"),  # a bool is not an int
    ("memory.gated=1", r"memory\.gated: expected true or false"),
    ("memory.layers=3", r"memory\.layers: expected a list"),
    ("memory.layers=[1, x]", r"memory\.layers\[1\]: expected an integer"),
    ("memory.mode=subtractive", r"memory\.mode: expected one of \['additive', 'replacement'\]"),
    ("memory.v_dim=wide", r"memory\.v_dim: expected int or NoneType"),
    ("sparse.eps=small", r"sparse\.eps: expected a number"),
    ("memory=3", r"memory: expected a mapping of MemoryConfig fields"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_exponent_floats_parse_in_overrides_and_yaml(tmp_path):
    # PyYAML reads 1e-3 (no dot) as text; a float field takes it as the number it is
    cfg = load_config(write(tmp_path, "train:\n  lr: 2e-4\n"), ["memory.value_lr=1e1", "sparse.eps=1E-8"])
    assert (cfg.train.lr, cfg.memory.value_lr, cfg.sparse.eps) == (2e-4, 10.0, 1e-8)


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    path = write(tmp_path, "sparse:\n  top_t: many\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: sparse\.top_t: expected an integer"):
        load_config(path)


@pytest.mark.parametrize("override,key", [
    (["memory.knn=16", "memory.n_keys=8"], r"memory\.knn: expected 1 <= knn <= n_keys \(= 8\), got 16"),
    (["memory.knn=0"], r"memory\.knn"),
    (["memory.k_dim=7"], r"memory\.k_dim: expected an even integer"),
    (["memory.layers=[]"], r"memory\.layers: expected at least one"),
    (["memory.layers=[2, 2]"], r"memory\.layers: expected distinct"),
    (["memory.heads=0"], r"memory\.heads"),
    (["memory.v_dim=0"], r"memory\.v_dim"),
    (["memory.value_lr=0"], r"memory\.value_lr"),
    (["sparse.top_t=0"], r"sparse\.top_t"),
    (["sparse.betas=[0.9]"], r"sparse\.betas"),
    (["sparse.weight_decay=0.1"], r"sparse\.weight_decay: only the adamw optimizer decays"),
    (["model.dtype=float16"], r"model\.dtype: float16 training needs loss scaling"),
    (["train.offload=true", "train.zero_stage=2"], r"train\.offload: needs train\.zero_stage=3, got zero_stage=2"),
    # NaN passes `x <= 0`; inf is no rate either
    (["train.lr=nan"], r"train\.lr: expected a positive learning rate, got nan"),
    (["train.lr=inf"], r"train\.lr: expected a positive learning rate, got inf"),
    (["memory.value_lr=nan"], r"memory\.value_lr: expected a positive learning rate"),
    (["memory.value_lr=inf"], r"memory\.value_lr: expected a positive learning rate"),
    (["retrofit.lr=nan"], r"retrofit\.lr: expected a positive learning rate, got nan"),
    (["retrofit.value_lr=inf"], r"retrofit\.value_lr: expected a positive learning rate, got inf"),
    (["retrofit.value_lr=0"], r"retrofit\.value_lr: expected a positive learning rate"),
    (["sparse.eps=nan"], r"sparse\.eps: expected a positive number"),
    (["sparse.kl_eps=0"], r"sparse\.kl_eps: expected a positive number"),
    (["sparse.max_grad_norm=nan"], r"sparse\.weight_decay / sparse\.max_grad_norm: expected >= 0"),
    (["train.weight_decay=nan"], r"train\.weight_decay: expected a finite number >= 0"),
    (["train.max_grad_norm=-1"], r"train\.max_grad_norm: expected a finite number >= 0"),
    (["memory.value_init_std=nan"], r"memory\.value_init_std: expected None or a finite number >= 0"),
    (["memory.scale_init=nan"], r"memory\.scale_init: expected a finite number, got nan"),
    (["memory.scale_init=-inf"], r"memory\.scale_init: expected a finite number, got -inf"),
    (["train.log_every=0"], r"train\.log_every: expected an integer >= 1, got 0"),
    (["train.save_every=-5"], r"train\.save_every: expected an integer >= 0 \(0 = only at the end\), got -5"),
    (["train.lora_dropout=1.5"], r"train\.lora_dropout: expected a probability in \[0, 1\), got 1\.5"),
    (["train.lora_dropout=1"], r"train\.lora_dropout: expected a probability in \[0, 1\)"),
    (["train.lora_dropout=-0.1"], r"train\.lora_dropout"),
    (["train.lora_dropout=nan"], r"train\.lora_dropout"),
    (["data.train_limit=0"], r"data\.train_limit: expected None \(every row\) or an integer >= 1, got 0"),
    (["data.background_batches=0"], r"data\.background_batches: expected an integer >= 1, got 0"),
])
def test_validate_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, override)


def test_edge_values_that_mean_something_still_load():
    cfg = load_config(None, ["train.save_every=0", "train.lora_dropout=0.5", "data.train_limit=null",
                             "data.train_limit=1", "memory.scale_init=-0.5", "memory.value_init_std=0",
                             "retrofit.value_lr=null", "train.max_grad_norm=0"])
    assert (cfg.train.save_every, cfg.train.lora_dropout, cfg.data.train_limit) == (0, 0.5, 1)
    assert load_config(None, ["data.train_limit=null"]).data.train_limit is None  # None = every row


def test_validate_on_the_dataclass_itself():
    with pytest.raises(ConfigError, match=r"memory\.knn"):
        MemoryConfig(n_keys=4, knn=5).validate()
    with pytest.raises(ConfigError, match=r"sparse\.top_t"):
        SparseConfig(top_t=-1).validate()


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file {missing}: not found"):
        load_config(missing)
    bad = write(tmp_path, "memory: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=rf"config file {bad}: not valid YAML"):
        load_config(bad)
    listy = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match=rf"config file {listy}: expected a mapping at the top level"):
        load_config(listy)


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(None, ["memory.knn=4", "memory.n_keys=16", "memory.layers=[0, 5]", "memory.v_dim=null",
                             "memory.mode=replacement", "memory.value_init_std=0.02",
                             "sparse.scoring=kl", "sparse.betas=[0.8, 0.95]", "out_dir=runs/abc"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # And once more through the file: stable.
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_string_fields_take_the_override_text_as_written():
    cfg = load_config(overrides=["out_dir=3", "data.train=on", "sparse.background=null"])
    assert cfg.out_dir == "3" and cfg.data.train == "on" and cfg.sparse.background is None


def test_yaml_file_with_a_number_for_a_string_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out_dir: 3\n")
    with pytest.raises(ConfigError, match="out_dir: expected a string"):
        load_config(path)


def test_bad_answer_continuation_names_the_field():
    from smf_ds.train.inputs import task_examples

    cfg = load_config(overrides=["data.train=unused.jsonl", "data.answer_continuation={answer}"])
    with pytest.raises(ConfigError, match=r"data.answer_continuation='\{answer\}'.*unknown placeholder"):
        task_examples(cfg, tokenizer=None)


class _CharTokenizer:
    """One id per character: enough to see which text became the training answer."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize("with_exp", [True, False])
def test_train_explanation_switches_the_explanation_in_the_answer(tmp_path, with_exp):
    from smf_ds.data import samples
    from smf_ds.train.inputs import task_examples

    rows = samples.medmcqa_rows(4, seed=0)
    has_exp = [bool(row.get("exp")) for row in rows]
    assert True in has_exp and False in has_exp  # the sample covers both kinds of row
    path = samples.write_rows(rows, tmp_path / "m.jsonl")
    cfg = load_config(overrides=[f"data.train={path}", f"data.train_explanation={str(with_exp).lower()}"])
    answers = ["".join(chr(i) for i, label in zip(e["input_ids"], e["labels"]) if label != -100 and i)
               for e in task_examples(cfg, _CharTokenizer())]
    assert ["Explanation:" in a for a in answers] == [with_exp and e for e in has_exp]
    assert all(a.startswith(" ") and "Answer:" not in a for a in answers)  # the answer alone carries the loss


def test_training_reads_the_train_split_not_the_evaluated_one(tmp_path):
    import datasets

    from smf_ds.data import samples
    from smf_ds.train.inputs import task_examples

    rows = samples.medmcqa_rows(6, seed=1)
    splits = {"train": rows[:4], "validation": rows[4:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "mm")
    cfg = load_config(overrides=[f"data.train={tmp_path / 'mm'}"])
    assert len(task_examples(cfg, _CharTokenizer())) == sum(r["choice_type"] == "single" for r in splits["train"])
    cfg = load_config(overrides=[f"data.train={tmp_path / 'mm'}", "data.train_split=validation"])
    assert len(task_examples(cfg, _CharTokenizer())) == sum(r["choice_type"] == "single" for r in splits["validation"])


def test_cli_takes_overrides_before_and_after_flags():
    from smf_ds.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "--config", "c.yaml", "train.steps=3", "--resume", "out_dir=/x"])
    assert args.overrides == ["train.steps=3", "out_dir=/x"] and args.resume and args.config == "c.yaml"
    with pytest.raises(SystemExit) as stop:  # what is neither a flag nor key=value is still refused
        parse_args(build_parser(), ["train", "a=1", "--resume", "steps"])
    assert stop.value.code == 2


def test_training_file_in_another_schema_names_the_field_and_counts(tmp_path):
    from smf_ds.data import samples
    from smf_ds.train.inputs import task_examples

    path = samples.write_rows(samples.oasst_rows(5, seed=0), tmp_path / "oasst.jsonl")
    cfg = load_config(overrides=[f"data.train={path}"])
    with pytest.raises(ConfigError, match=rf"data\.train={path}: no usable MedMCQA row .*\(\d+ rows read, \d+ malformed"):
        task_examples(cfg, _CharTokenizer())


def test_a_retrofits_derived_settings_are_found_not_listed():
    """The settings a retrofit sets from retrofit.* (a resume's refusal names the retrofit.* one):
    derived by changing each input, and every one a real setting."""
    from smf_ds.config import flatten_dotted, to_dict
    from smf_ds.train.retrofit import derived_keys

    keys = derived_keys()
    assert set(keys) == {"train.method", "train.scope", "train.steps", "train.lr", "memory.value_lr", "sparse.scoring",
                         "sparse.optimizer", "sparse.weight_decay", "data.background"}
    assert set(keys) <= set(flatten_dotted(to_dict(load_config())))


def test_the_first_spelling_of_replicated_tables_still_reads(caplog):
    """memory.sharding='local' (a whole table on every rank) is now 'replicated': the old spelling
    reads as the new one, with one deprecation message."""
    with caplog.at_level("WARNING"):
        old = load_config(overrides=["memory.sharding=local"])
        load_config(overrides=["memory.sharding=local"])
    assert old.memory.sharding == "replicated" == load_config().memory.sharding
    assert [r.getMessage() for r in caplog.records].count(
        "deprecated: memory.sharding='local' is now spelled 'replicated' (a whole table on every rank)") <= 1
    with pytest.raises(ConfigError, match=r"memory\.sharding: expected one of \['replicated', 'row', 'column'.*got 'rows'"):
        load_config(overrides=["memory.sharding=rows"])
