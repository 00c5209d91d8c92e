"""An offline synthetic world, written as files in the real datasets' hub schemas.

General knowledge (countries, capitals, rivers, languages) is what the base model learns first and
what finetuning may make it forget; the task is a set of new, fictional medical facts asked as
MedMCQA-style questions. Everything is generated from a seed, so the main job runs anywhere with
no download:

  general.jsonl   {"text"}                           pretraining corpus of the tiny base model
  oasst.jsonl     OASST1 messages (prompter/assistant) general text for background stats
  wikitext.jsonl  {"text"}                           WikiText-style articles of the general facts (the base
                                                     model learns them; perplexity on them probes forgetting)
  triviaqa.jsonl  TriviaQA rc.nocontext rows          general-knowledge questions
  medmcqa_train.jsonl / medmcqa_test.jsonl            the task (MedMCQA schema)
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ve", "su", "ni", "do", "pe", "ga", "zu", "fi", "ho", "ba", "te",
             "ri", "mo", "sa", "le", "nu", "vi", "ko", "da"]


def _names(rng: random.Random, n: int, syllables: int, suffix: str = "") -> list[str]:
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize() + suffix)
    return sorted(seen)


@dataclass
class WorldSpec:
    countries: int = 40
    diseases: int = 48
    seed: int = 0


def _general_facts(rng: random.Random, spec: WorldSpec):
    countries = _names(rng, spec.countries, 3)
    capitals = _names(rng, spec.countries, 2, "ton")
    rivers = _names(rng, spec.countries, 2, "a")
    languages = _names(rng, spec.countries, 2, "ish")
    facts = []
    for c, cap, riv, lang in zip(countries, capitals, rivers, languages):
        facts.append({"country": c, "capital": cap, "river": riv, "language": lang})
    return facts


def _general_sentences(f: dict) -> list[str]:
    c = f["country"]
    return [f"The capital of {c} is {f['capital']}.",
            f"The longest river of {c} is the {f['river']}.",
            f"People in {c} speak {f['language']}.",
            f"{f['capital']} is the capital city of {c}, on the {f['river']}."]


def _trivia(f: dict, i: int) -> list[dict]:
    def row(q, a, k):
        return {"question": q, "question_id": f"synth_tqa_{i}_{k}", "question_source": "synthetic",
                "answer": {"value": a, "aliases": [a], "normalized_aliases": [a.lower()],
                           "normalized_value": a.lower(), "type": "WikipediaEntity", "matched_wiki_entity_name": ""}}
    c = f["country"]
    return [row(f"What is the capital of {c}?", f["capital"], 0),
            row(f"What is the longest river of {c}?", f["river"], 1),
            row(f"Which language do people in {c} speak?", f["language"], 2)]


def _medical(rng: random.Random, spec: WorldSpec):
    diseases = _names(rng, spec.diseases, 3, "osis")
    drugs = _names(rng, spec.diseases, 3, "mab")
    organs = ["liver", "kidney", "heart", "lung", "skin", "brain", "eye", "bone"]
    rows = []
    for i, (disease, drug) in enumerate(zip(diseases, drugs)):
        organ = organs[i % len(organs)]
        for k, (question, answer, pool) in enumerate([
            (f"Which drug is the first-line treatment of {disease}?", drug, drugs),
            (f"Which organ does {disease} affect first?", organ, organs),
        ]):
            wrong = rng.sample([p for p in pool if p != answer], 3)
            options = wrong + [answer]
            rng.shuffle(options)
            rows.append({"id": f"synth_med_{i}_{k}", "question": question,
                         "opa": options[0], "opb": options[1], "opc": options[2], "opd": options[3],
                         "cop": options.index(answer), "choice_type": "single",
                         "exp": f"{disease}: {answer}.", "subject_name": "Synthetic", "topic_name": None})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


SPEC_FILE = "world_spec.json"
FILES = ("general", "oasst", "wikitext", "triviaqa", "medmcqa_train", "medmcqa_test")


def world_files(directory: str | Path) -> dict[str, Path]:
    """name -> path of the world's files in `directory` (written by build_world)."""
    return {name: Path(directory) / f"{name}.jsonl" for name in FILES}


def check_world(directory: str | Path, spec: WorldSpec) -> None:
    """Refuse a directory that holds another world, so models trained on one world are never
    evaluated on another."""
    spec_path = Path(directory) / SPEC_FILE
    wanted = dataclasses.asdict(spec)
    if spec_path.is_file() and json.loads(spec_path.read_text()) != wanted:
        raise ConfigError(f"{spec_path}: this directory holds the world {spec_path.read_text().strip()}, not "
                          f"{json.dumps(wanted)}; use another output directory (or the same world seed)")


def build_world(directory: str | Path, spec: WorldSpec | None = None) -> dict[str, Path]:
    """Write the world's files into `directory` (after check_world; the spec goes to
    world_spec.json); returns world_files(directory). One process writes: see
    smf_ds.experiment.jobs.prepare_world."""
    spec = spec or WorldSpec()
    rng = random.Random(spec.seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    check_world(out, spec)
    (out / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec)))
    facts = _general_facts(rng, spec)
    sentences = [s for f in facts for s in _general_sentences(f)]
    trivia = [r for i, f in enumerate(facts) for r in _trivia(f, i)]
    # The base model also sees the general questions answered, so TriviaQA probes something it knows.
    qa_text = [f"Question: {r['question']} Answer: {r['answer']['value']}" for r in trivia]
    general = [{"text": t} for t in sentences + qa_text]
    rng.shuffle(general)

    oasst = []
    for i, s in enumerate(sentences):
        pid = f"synth_p{i}"
        oasst.append({"message_id": pid, "parent_id": None, "text": "Tell me a fact.", "role": "prompter",
                      "lang": "en", "rank": None, "deleted": False, "review_result": True})
        oasst.append({"message_id": f"synth_a{i}", "parent_id": pid, "text": s, "role": "assistant",
                      "lang": "en", "rank": 0, "deleted": False, "review_result": True})

    wikitext = []
    for f in facts:
        wikitext.append({"text": f" = {f['country']} = \n"})
        wikitext.append({"text": " " + " ".join(_general_sentences(f)) + " \n"})

    medical = _medical(rng, spec)
    rng.shuffle(medical)
    # The task's facts are all in training; the test asks the same facts with options reshuffled,
    # which measures whether the facts were learned (the point of the demo) rather than guessed.
    test = []
    for row in medical:
        opts = [row["opa"], row["opb"], row["opc"], row["opd"]]
        answer = opts[row["cop"]]
        rng.shuffle(opts)
        test.append({**row, "id": row["id"] + "_test", "opa": opts[0], "opb": opts[1], "opc": opts[2],
                     "opd": opts[3], "cop": opts.index(answer)})
    paths = world_files(out)
    _write_jsonl(paths["general"], general)
    _write_jsonl(paths["oasst"], oasst)
    _write_jsonl(paths["wikitext"], wikitext)
    _write_jsonl(paths["triviaqa"], trivia)
    _write_jsonl(paths["medmcqa_train"], medical)
    _write_jsonl(paths["medmcqa_test"], test)
    return paths
