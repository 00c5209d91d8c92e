"""The synthetic world's probes are held out from the base model's pretraining text (it learns the
facts, never the probes' sentences or questions), and its tokenizer has every option letter as
one token."""
import json
import re

import pytest

from smf_ds.data.synthetic_world import RELATIONS, WorldSpec, build_world


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _held_out_units(world) -> list[str]:
    """Each held-out trivia question, and each title and sentence of the held-out articles."""
    units = [r["question"] for r in _rows(world["triviaqa"])]
    for r in _rows(world["wikitext"]):
        units += [u for u in re.split(r"(?<=\.)\s+", r["text"].strip()) if u]
    return units


def _leaks(units: list[str], pretraining_text: str) -> list[str]:
    return [u for u in units if u in pretraining_text]


class _Captured(Exception):
    pass


def _pretraining_inputs(monkeypatch, tmp_path, seed: int):
    """(world, tokenizer, the decoded texts of every example the base model pretrains on), taken from
    pretrain_base's call to the Trainer (which is not run)."""
    from smf_ds.experiment import jobs

    seen = {}

    def tokenizer(*args, **kwargs):
        seen["tokenizer"] = jobs_build_tokenizer(*args, **kwargs)
        return seen["tokenizer"]

    def trainer(cfg, model, examples, pad_id):
        seen["examples"] = examples
        raise _Captured

    jobs_build_tokenizer = jobs.build_tiny_tokenizer
    monkeypatch.setattr(jobs, "build_tiny_tokenizer", tokenizer)
    monkeypatch.setattr(jobs, "Trainer", trainer)
    world = jobs.prepare_world(tmp_path / "world", WorldSpec(seed=seed))
    with pytest.raises(_Captured):
        jobs.pretrain_base(world, tmp_path / "base", steps=1)
    tok = seen["tokenizer"]
    texts = [tok.decode(ex["input_ids"]) for ex in seen["examples"]]
    return world, tok, texts


def test_no_held_out_probe_text_occurs_in_the_base_models_pretraining_text(monkeypatch, tmp_path):
    world, _, texts = _pretraining_inputs(monkeypatch, tmp_path, seed=0)
    pretraining = "\n".join(texts)
    units = _held_out_units(world)
    trivia, articles = _rows(world["triviaqa"]), _rows(world["wikitext"])
    assert len(trivia) == 40 * len(RELATIONS) and sum(r["text"].startswith(" = ") for r in articles) == 40
    assert len(units) == len(trivia) + 40 * (1 + len(RELATIONS))
    assert _leaks(units, pretraining) == []
    # nor the other way: no pretraining sentence or question inside a held-out one (whole ones: the
    # general texts, and the seen articles' sentences, which windows cut anywhere)
    held_out = "\n".join(units)
    whole = [t for t in texts if t.endswith("<|endoftext|>")]
    whole += [u for r in _rows(world["wikitext_seen"]) for u in re.split(r"(?<=\.)\s+", r["text"].strip())]
    assert len(whole) == 720 + 40 * (1 + 3 * len(RELATIONS))
    pretraining_units = {u.strip() for t in whole for u in re.split(r"(?<=[.?])\s+|Question: | Answer: \S+", t)}
    assert [u for u in pretraining_units if len(u) > 12 and u in held_out] == []
    # The check finds a planted leak (a held-out question answered in the general text).
    assert _leaks(units, pretraining + f"\nQuestion: {trivia[7]['question']} Answer: x") == [trivia[7]["question"]]
    # The memorised-window probe reads what the base did: the seen articles' lines are pretrained on.
    for row in _rows(world["wikitext_seen"]):
        for sentence in re.split(r"(?<=\.)\s+", row["text"].strip()):
            assert sentence in pretraining
    # The facts are taught: every held-out question's answer is read in question/answer pairs of
    # the other phrasings of the same question (and in sentences next to its country).
    countries = [r["text"].strip()[2:-2] for r in _rows(world["wikitext_seen"]) if r["text"].startswith(" = ")]
    assert len(set(countries)) == 40
    eos = "<|endoftext|>"
    pairs = [t[:-len(eos)] for t in texts if t.startswith("Question: ") and t.endswith(eos)]
    for r in trivia:
        country = next(c for c in countries if re.search(rf"\b{c}\b", r["question"]))
        answer = r["answer"]["value"]
        asked = [p.split(" Answer: ")[0][len("Question: "):] for p in pairs if re.search(rf"\b{country}\b", p)
                 and p.endswith(f" Answer: {answer}")]
        assert len(asked) == 3 and r["question"] not in asked, (r["question"], asked)
        assert any(country in t and answer in t and not t.startswith("Question: ") for t in texts)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_build_world_holds_the_probes_out_on_other_seeds(tmp_path, seed):
    from smf_ds.data.synthetic_world import held_out_leaks, pretraining_texts

    world = build_world(tmp_path / "w", WorldSpec(seed=seed))
    assert held_out_leaks(world) == []
    assert _leaks(_held_out_units(world), "\n".join(pretraining_texts(world))) == []
    # A planted leak is found by build_world's own check too.
    with world["general"].open("a") as f:
        f.write(json.dumps({"text": _rows(world["wikitext"])[1]["text"]}) + "\n")
    assert held_out_leaks(world)


def test_the_worlds_tokenizer_has_each_option_letter_as_one_token(monkeypatch, tmp_path):
    from smf_ds.data.tiny import build_tiny_tokenizer
    from smf_ds.experiment.jobs import OPTION_LETTERS

    assert OPTION_LETTERS == (" A", " B", " C", " D")
    _, tok, _ = _pretraining_inputs(monkeypatch, tmp_path, seed=0)
    for letter in OPTION_LETTERS:
        assert len(tok(letter, add_special_tokens=False)["input_ids"]) == 1, letter
    assert tok.tokenize(" Answer: B") == ["ĠAnswer", ":", "ĠB"]  # words that start with a letter stay whole
    # Without the option, the same texts split some letters (why the option exists), and a
    # vocabulary too small to hold them is refused, not silently split.
    texts = [json.loads(line)["text"] for line in (tmp_path / "world" / "general.jsonl").read_text().splitlines()]
    plain = build_tiny_tokenizer(texts, vocab_size=768)
    assert any(len(plain(letter, add_special_tokens=False)["input_ids"]) > 1 for letter in OPTION_LETTERS)
    with pytest.raises(ValueError, match="single_tokens.*did not become one token"):
        build_tiny_tokenizer(texts, vocab_size=259, single_tokens=OPTION_LETTERS)


def test_a_directory_of_an_earlier_world_version_is_refused(tmp_path):
    from smf_ds.config import ConfigError

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "world_spec.json").write_text(json.dumps({"countries": 40, "diseases": 48, "seed": 0}))
    with pytest.raises(ConfigError, match="world_spec.json: this directory holds the world"):
        build_world(tmp_path / "w", WorldSpec(seed=0))
