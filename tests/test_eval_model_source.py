"""A model name that can only be a local path and does not exist is an error naming the flag or
field ("no such directory"), not the hub's "Repo id must be in the form ..."; hub ids stay hub ids."""
import pytest


from smf_ds.config import ConfigError, InputError, load_config
from smf_ds import models
from smf_ds.eval import cli
from smf_ds.model_source import looks_local, missing_dir_note, model_source


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "meta-llama/Llama-3.2-1B"])
def test_hub_ids_pass_through(name):
    assert not looks_local(name)
    assert model_source(name) == name


@pytest.mark.parametrize("name", ["/nonexistent/model", "./nomodel", "../nomodel", "~/nomodel", "runs/a/model", "."])
def test_local_looking_names(name):
    assert looks_local(name)


def test_missing_local_paths_raise_and_existing_ones_resolve(tmp_path, monkeypatch):
    for name in (str(tmp_path / "nomodel"), "./nomodel", "~/nomodel", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="^no such directory"):
            model_source(name)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="^not a directory"):
        model_source(str(tmp_path / "file.json"))
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_source("~/model") == str(tmp_path / "model")  # from_pretrained does not expand ~
    monkeypatch.chdir(tmp_path)
    assert model_source("model") == "model"
    # "model/x" could be a hub id, so it goes to the hub; its parent is a local directory: a failed load says so
    assert model_source("model/x") == "model/x"
    assert missing_dir_note("model/x") == "; no local directory model/x either (model exists)"
    assert missing_dir_note("Qwen/Qwen2.5-0.5B-Instruct") == ""


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--limit", "0"], "--limit: expected numbers >= 1, got '0'"),
    (["--sample", "medmcqa=0"], "--sample: expected numbers >= 1"),
    (["--model", "./nonexistent-model"], "--model ./nonexistent-model: no such directory"),
    (["--memory-adapter", "/nonexistent/adapter"], "--memory-adapter /nonexistent/adapter: no such directory"),
])
def test_eval_cli_names_the_flag(eval_world, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on CI; a GPU box would take --device cuda
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", str(eval_world.model_dir), "--tasks", "medmcqa", "--no-progress", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Repo id" not in err


def test_memory_adapter_is_checked_before_the_model_is_loaded(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter directory was checked")

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(models.ModelLoadError, match="--memory-adapter /nonexistent/adapter: no such directory"):
        models.load_model_and_tokenizer("Qwen/Qwen2.5-0.5B-Instruct", memory_adapter="/nonexistent/adapter")


def test_train_names_the_field(tmp_path):
    from smf_ds.train.build import load_tokenizer_and_model

    cfg = load_config(overrides=[f"model.name_or_path={tmp_path / 'nomodel'}"])
    with pytest.raises(ConfigError, match=r"^model.name_or_path='.*nomodel': no such directory"):
        load_tokenizer_and_model(cfg)


def test_a_model_dir_without_tokenizer_files_is_named(eval_world, tmp_path):
    """AutoTokenizer loads an empty tokenizer there, which encodes every text to nothing."""
    import shutil

    bare = tmp_path / "weights_only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(eval_world.model_dir / name, bare / name)
    with pytest.raises(InputError, match=rf"--model {bare}: its tokenizer encodes text to no tokens"):
        models.load_model_and_tokenizer(str(bare))
    from smf_ds.train.build import load_tokenizer_and_model

    with pytest.raises(InputError, match=r"model.name_or_path='.*weights_only': "):
        load_tokenizer_and_model(load_config(overrides=[f"model.name_or_path={bare}"]))


def test_a_run_dir_or_a_memory_adapter_as_model_says_what_to_pass(eval_world, tmp_path):
    """`--model RUN_DIR` or `--model RUN_DIR/memory_adapter` is not a model: the error gives the
    command that evaluates it, with the base model read from the run's config.yaml."""
    from smf_ds.config import MemoryConfig, SMFConfig, save_config
    from smf_ds.models import ModelLoadError, load_model_and_tokenizer
    from smf_ds.memory.adapter import save_memory_adapter
    from smf_ds.memory.inject import inject_memory
    from fixtures_eval import load_tiny

    model, _ = load_tiny(eval_world.model_dir)
    run = tmp_path / "run"
    save_memory_adapter(inject_memory(model, MemoryConfig(layers=[0], n_keys=4, heads=1, knn=2, k_dim=4)),
                        run / "memory_adapter")
    cfg = SMFConfig()
    cfg.model.name_or_path = str(eval_world.model_dir)
    save_config(cfg, run / "config.yaml")
    for given in (run, run / "memory_adapter"):
        with pytest.raises(ModelLoadError, match=rf"--model {given}: a (run directory|memory adapter), not a model; "
                                               rf"evaluate it with --model {eval_world.model_dir} "
                                               rf"--memory-adapter {run / 'memory_adapter'}$"):
            load_model_and_tokenizer(str(given), dtype="float32", device="cpu")
