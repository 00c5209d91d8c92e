"""An offline synthetic world, written as files in the real datasets' hub schemas.

General knowledge (countries, capitals, rivers, languages) is what the base model learns first and
what finetuning may make it forget; the task is a set of new, fictional medical facts asked as
MedMCQA-style questions. Everything is generated from a seed, so the main job runs anywhere with
no download:

  general.jsonl        {"text"}                      pretraining corpus of the tiny base model: the general
                                                     facts as sentences, and trivia questions answered
  wikitext_seen.jsonl  {"text"}                      WikiText-style articles of the general facts, also
                                                     pretrained on (the memorised-window probe)
  oasst.jsonl          OASST1 messages               general text for background stats
  wikitext.jsonl       {"text"}                      held-out articles: the same facts in sentences the
                                                     base never read (the perplexity probe of forgetting)
  triviaqa.jsonl       TriviaQA rc.nocontext rows    held-out phrasings of the general questions
  medmcqa_train.jsonl / medmcqa_test.jsonl           the task (MedMCQA schema)

build_world checks that no held-out probe text occurs in the pretraining text (held_out_leaks).
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
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
    # What the files hold: a directory of another version is refused (its base read other text).
    version: int = 2


def _general_facts(rng: random.Random, spec: WorldSpec):
    countries = _names(rng, spec.countries, 3)
    capitals = _names(rng, spec.countries, 2, "ton")
    rivers = _names(rng, spec.countries, 2, "a")
    languages = _names(rng, spec.countries, 2, "ish")
    facts = []
    for c, cap, riv, lang in zip(countries, capitals, rivers, languages):
        facts.append({"country": c, "capital": cap, "river": riv, "language": lang})
    return facts


# Each general fact is written in K phrasings (sentences for articles, questions for trivia). For
# every country one phrasing of each relation is held out: the base model pretrains on the other
# K-1 (so it learns the fact, and each phrasing from the other countries) and never reads the
# held-out one, which the forgetting probes use. A probe that the base has read verbatim measures
# recall of memorised text (a perplexity of 1.00), not knowledge.
RELATIONS = ("capital", "river", "language")
SENTENCES = {
    "capital": ["The capital of {country} is {capital}.", "{capital} is the capital city of {country}.",
                "{country} is governed from its capital, {capital}.", "The government of {country} sits in {capital}."],
    "river": ["The longest river of {country} is the {river}.", "The {river} is the longest river in {country}.",
              "{country} is crossed by the {river}, its longest river.", "No river in {country} is longer than the {river}."],
    "language": ["People in {country} speak {language}.", "{language} is the language of {country}.",
                 "The people of {country} speak {language}.", "In {country}, the common language is {language}."],
}
QUESTIONS = {
    "capital": ["What is the capital of {country}?", "Which city is the capital of {country}?",
                "What city serves as the capital of {country}?", "{country} has which city as its capital?"],
    "river": ["What is the longest river of {country}?", "Which river is the longest in {country}?",
              "What is the name of the longest river in {country}?", "Which is the longest river that crosses {country}?"],
    "language": ["Which language do people in {country} speak?", "What language is spoken in {country}?",
                 "What do the people of {country} speak?", "In {country}, which language do people use?"],
}
PHRASINGS = 4
SEEN_TITLE = " = {country} = "
HELD_OUT_TITLE = " = {capital} = "  # an article on the capital: a title the base never read, in words it knows


def _held_out(i: int, r: int) -> int:
    """The phrasing of relation r held out for country i: each phrasing is held out for a quarter of
    the countries and read in pretraining for the rest."""
    return (i + r) % PHRASINGS


def _paragraphs(f: dict, i: int, held_out: bool) -> list[list[str]]:
    """Paragraphs of one sentence per relation: the held-out one, or the K-1 read in pretraining
    (so a held-out paragraph is shaped like a seen one: a probe should not pay for its length)."""
    ks = [[_held_out(i, r)] if held_out else [k for k in range(PHRASINGS) if k != _held_out(i, r)]
          for r in range(len(RELATIONS))]
    return [[SENTENCES[rel][ks[r][j]].format(**f) for r, rel in enumerate(RELATIONS)] for j in range(len(ks[0]))]


def _trivia(f: dict, i: int, held_out: bool) -> list[dict]:
    def row(q, a, k):
        return {"question": q, "question_id": f"synth_tqa_{i}_{k}", "question_source": "synthetic",
                "answer": {"value": a, "aliases": [a], "normalized_aliases": [a.lower()],
                           "normalized_value": a.lower(), "type": "WikipediaEntity", "matched_wiki_entity_name": ""}}
    rows = []
    for r, rel in enumerate(RELATIONS):
        ks = [_held_out(i, r)] if held_out else [k for k in range(PHRASINGS) if k != _held_out(i, r)]
        rows += [row(QUESTIONS[rel][k].format(**f), f[rel], f"{r}{k}") for k in ks]
    return rows


def _article(title: str, paragraphs: list[list[str]], rng: random.Random) -> list[dict]:
    rows = [{"text": title + "\n"}]
    for sentences in paragraphs:
        sentences = list(sentences)
        rng.shuffle(sentences)
        rows.append({"text": " " + " ".join(sentences) + " \n"})
    return rows


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


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


SPEC_FILE = "world_spec.json"
FILES = ("general", "oasst", "wikitext", "wikitext_seen", "triviaqa", "medmcqa_train", "medmcqa_test")


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
    text_rng = random.Random(f"{spec.seed}-text")  # the order of the texts (the facts come from rng)
    sentences = [s for i, f in enumerate(facts) for p in _paragraphs(f, i, held_out=False) for s in p]
    # The base model also reads the general questions answered (in the phrasings not held out), so
    # the TriviaQA probe asks something it knows, in words it has not read.
    qa_text = [f"Question: {r['question']} Answer: {r['answer']['value']}"
               for i, f in enumerate(facts) for r in _trivia(f, i, held_out=False)]
    general = [{"text": t} for t in sentences + qa_text]
    text_rng.shuffle(general)

    oasst = []
    for i, s in enumerate(sentences):
        pid = f"synth_p{i}"
        oasst.append({"message_id": pid, "parent_id": None, "text": "Tell me a fact.", "role": "prompter",
                      "lang": "en", "rank": None, "deleted": False, "review_result": True})
        oasst.append({"message_id": f"synth_a{i}", "parent_id": pid, "text": s, "role": "assistant",
                      "lang": "en", "rank": 0, "deleted": False, "review_result": True})

    seen_articles, held_out_articles, trivia = [], [], []
    for i, f in enumerate(facts):
        seen_articles += _article(SEEN_TITLE.format(**f), _paragraphs(f, i, held_out=False), text_rng)
        held_out_articles += _article(HELD_OUT_TITLE.format(**f), _paragraphs(f, i, held_out=True), text_rng)
        trivia += _trivia(f, i, held_out=True)

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
    _write_jsonl(paths["wikitext"], held_out_articles)
    _write_jsonl(paths["wikitext_seen"], seen_articles)
    _write_jsonl(paths["triviaqa"], trivia)
    _write_jsonl(paths["medmcqa_train"], medical)
    _write_jsonl(paths["medmcqa_test"], test)
    leaks = held_out_leaks(paths)
    if leaks:  # the phrasings above overlap: the probes would measure memorised text
        raise RuntimeError(f"{out}: held-out probe text occurs in the base model's pretraining text: {leaks[:3]}")
    return paths


def pretraining_texts(paths: dict[str, Path]) -> list[str]:
    """Every text the base model pretrains on: the general text and the seen articles' lines."""
    return [r["text"] for name in ("general", "wikitext_seen") for r in _read_jsonl(paths[name])]


def held_out_texts(paths: dict[str, Path]) -> list[str]:
    """The probes' held-out units: each trivia question, and each title and sentence of the
    held-out articles."""
    units = [r["question"] for r in _read_jsonl(paths["triviaqa"])]
    for r in _read_jsonl(paths["wikitext"]):
        units += [u for u in re.split(r"(?<=\.)\s+", r["text"].strip()) if u]
    return units


def held_out_leaks(paths: dict[str, Path]) -> list[str]:
    """Held-out units that occur in the pretraining text, and pretraining sentences or questions
    that occur in a held-out unit; empty when the probes are held out."""
    seen = pretraining_texts(paths)
    seen_units = {u for t in seen for u in re.split(r" Answer: .*|Question: |(?<=[.?])\s+", t.strip()) if u.strip()}
    seen_text = "\n".join(seen)
    held = held_out_texts(paths)
    held_text = "\n".join(held)
    return ([u for u in held if u in seen_text]
            + [u for u in sorted(seen_units) if len(u) > 12 and u in held_text])
