"""A resumed run reads what it read before: its examples and background stats are checked by
content (run.json records their digests), so a moved run dir resumes, and replaced stats or
changed training data are refused by name instead of silently training another run."""
import json
import shutil

import pytest

from smf_ds.config import load_config
from smf_ds.data import samples
from smf_ds.train.background import background_main
from smf_ds.train.run import train_main

from distributed import run_distributed
from test_train_loop import _config_error_of

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("resume_world")
    medmcqa = samples.write_rows(samples.medmcqa_rows(12, seed=5), root / "medmcqa.jsonl")
    fewer = samples.write_rows(samples.medmcqa_rows(11, seed=5), root / "medmcqa_11.jsonl")
    oasst = samples.write_rows(samples.oasst_rows(16, seed=5), root / "oasst.jsonl")
    texts = [json.dumps(r) for p in (medmcqa, oasst) for r in map(json.loads, p.read_text().splitlines())]
    build_tiny_model(build_tiny_tokenizer(texts, vocab_size=300), root / "model", hidden=32, layers=2, seed=0)
    return {"model": root / "model", "medmcqa": medmcqa, "fewer": fewer, "oasst": oasst}


def _cfg(world, out_dir, *extra):
    return load_config(overrides=[
        f"model.name_or_path={world['model']}", "memory.layers=[1]", "memory.n_keys=8", "memory.heads=2",
        "memory.knn=4", "memory.k_dim=8", f"data.train={world['medmcqa']}", f"data.background={world['oasst']}",
        "data.background_batches=2", "sparse.scoring=tfidf", "sparse.top_t=4", "train.micro_batch_size=4",
        "train.max_length=64", "train.save_every=2", f"out_dir={out_dir}", *extra])


def _scenario(rank, world_size, world, tmp):
    first, moved = tmp / "first", tmp / "moved"
    background_main(_cfg(world, first))
    train_main(_cfg(world, first, "train.steps=2"), progress=False)
    stats = (first / "background.safetensors").read_bytes()
    out = {"rewrite": _config_error_of(lambda: background_main(_cfg(world, first, "data.background_batches=3"))),
           "stats_kept": (first / "background.safetensors").read_bytes() == stats}
    # The run dir moves: its default stats path moves with it.
    shutil.move(first, moved)
    out["moved"] = train_main(_cfg(world, moved, "train.steps=4"), resume=True, progress=False)
    # Other stats at the same path (computed elsewhere, then copied over it).
    background_main(_cfg(world, tmp / "other", "data.background_batches=3"))
    shutil.copy(tmp / "other" / "background.safetensors", moved / "background.safetensors")
    out["other_stats"] = _config_error_of(
        lambda: train_main(_cfg(world, moved, "train.steps=6"), resume=True, progress=False))
    # The old stats back, somewhere else: the same content, so the run goes on.
    (tmp / "elsewhere.safetensors").write_bytes(stats)
    out["other_data"] = _config_error_of(lambda: train_main(
        _cfg(world, moved, "train.steps=6", f"sparse.background={tmp / 'elsewhere.safetensors'}",
             f"data.train={world['fewer']}"), resume=True, progress=False))
    elsewhere = f"sparse.background={tmp / 'elsewhere.safetensors'}"
    out["elsewhere"] = train_main(_cfg(world, moved, "train.steps=6", elsewhere), resume=True, progress=False)
    return out


def test_resume_checks_its_inputs_by_content(world, tmp_path):
    out = run_distributed(_scenario, 1, world, tmp_path)[0]
    assert "holds the checkpoints of an earlier run" in out["rewrite"] and "--out FILE" in out["rewrite"]
    assert out["stats_kept"]
    assert out["moved"]["resumed_at_step"] == 2 and out["moved"]["steps"] == 4
    assert "sparse.background: other background stats (2 batches, digest" in out["other_stats"]
    assert "3 batches, digest" in out["other_stats"]
    assert "data.train: other training examples (12 examples, digest" in out["other_data"]
    assert "11 examples" in out["other_data"] and "sparse.background" not in out["other_data"]
    assert out["elsewhere"]["resumed_at_step"] == 4 and out["elsewhere"]["steps"] == 6
