"""Small seeded rows in exactly the hub schemas (MedMCQA, TriviaQA rc.nocontext, WikiText, OASST1).

For tests, benchmarks and demos that must not download anything: the rows have every field the
hub rows have (with made-up content) and go through the same loaders and validation.
`write_rows(rows, path)` writes .jsonl, .json, .parquet, or a save_to_disk directory.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("heart liver kidney lung brain nerve blood bone skin muscle enzyme hormone insulin fever pain dose drug "
         "acid cell gland artery vein tumor virus infection vitamin protein river city king war church music film "
         "island mountain novel player season album village station bridge school").split()
SUBJECTS = ("Anatomy", "Physiology", "Pharmacology", "Pathology", "Medicine", "Surgery")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def medmcqa_rows(n: int, seed: int = 0, multi_every: int = 0) -> list[dict]:
    """MedMCQA rows: id, question, opa..opd, cop (0-3), choice_type, exp, subject_name, topic_name.

    With multi_every=k every k-th row has choice_type 'multi'.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        multi = multi_every > 0 and i % multi_every == multi_every - 1
        rows.append({"id": f"{seed:04x}-mcq-{i:05d}", "question": _sentence(rng, 6, 18).capitalize() + "?",
                     "opa": _sentence(rng, 1, 4), "opb": _sentence(rng, 1, 4), "opc": _sentence(rng, 1, 4),
                     "opd": _sentence(rng, 1, 4), "cop": rng.randrange(4),
                     "choice_type": "multi" if multi else "single",
                     "exp": _sentence(rng, 5, 20) if rng.random() < 0.7 else None,
                     "subject_name": rng.choice(SUBJECTS), "topic_name": None})
    return rows


def triviaqa_rows(n: int, seed: int = 0) -> list[dict]:
    """TriviaQA rc.nocontext rows: question, question_id, question_source, entity_pages, search_results, answer."""
    rng = random.Random(seed + 1)
    rows = []
    for i in range(n):
        value = _sentence(rng, 1, 3).title()
        aliases = [value] + [_sentence(rng, 1, 2).title() for _ in range(rng.randint(0, 3))]
        norm = [a.lower() for a in aliases]
        rows.append({"question": "Which " + _sentence(rng, 4, 14) + "?", "question_id": f"tc_{seed}_{i}",
                     "question_source": "http://www.example.org/",
                     "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
                     "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                                        "search_context": []},
                     "answer": {"aliases": aliases, "normalized_aliases": norm, "matched_wiki_entity_name": "",
                                "normalized_matched_wiki_entity_name": "", "normalized_value": value.lower(),
                                "type": "WikipediaEntity", "value": value}})
    return rows


def wikitext_rows(n_articles: int, seed: int = 0, paragraphs: int = 3) -> list[dict]:
    """WikiText raw rows ({"text"}): per article a title line, blank lines, section headings, paragraphs."""
    rng = random.Random(seed + 2)
    rows = [{"text": ""}]
    for a in range(n_articles):
        rows += [{"text": f" = {_sentence(rng, 1, 3).title()} = \n"}, {"text": ""}]
        for p in range(paragraphs):
            if p == 1:
                rows += [{"text": f" = = {_sentence(rng, 1, 2).title()} = = \n"}, {"text": ""}]
            body = " . ".join(_sentence(rng, 5, 15) for _ in range(rng.randint(2, 5)))
            rows += [{"text": f" {body} . \n"}, {"text": ""}]
    return rows


def oasst_rows(n_trees: int, seed: int = 0) -> list[dict]:
    """OASST1 messages: a prompter message and two ranked assistant replies per tree (some non-English)."""
    rng = random.Random(seed + 3)
    rows = []
    for t in range(n_trees):
        lang = "en" if t % 5 else "de"
        root = f"m{seed}-{t}-0"
        base = {"user_id": f"u{t}", "created_date": "2023-02-05T00:00:00+00:00", "review_count": 3,
                "review_result": True, "deleted": False, "synthetic": False, "model_name": None, "detoxify": None,
                "message_tree_id": root, "tree_state": "ready_for_export", "emojis": None, "labels": None, "lang": lang}
        rows.append({**base, "message_id": root, "parent_id": None, "text": _sentence(rng, 5, 12) + "?",
                     "role": "prompter", "rank": None})
        for r in range(2):
            rows.append({**base, "message_id": f"m{seed}-{t}-{r + 1}", "parent_id": root,
                         "text": _sentence(rng, 10, 30) + ".", "role": "assistant", "rank": r})
    return rows


def write_rows(rows: list[dict], path: str | Path, fmt: str | None = None) -> Path:
    """Write rows as fmt 'jsonl' | 'json' | 'parquet' | 'disk' (default: from the suffix; no suffix = disk)."""
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(path.suffix, "disk")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt in ("parquet", "disk"):
        from datasets import Dataset

        ds = Dataset.from_list(rows)
        ds.to_parquet(str(path)) if fmt == "parquet" else ds.save_to_disk(str(path))
    else:
        raise ValueError(f"format: expected jsonl, json, parquet or disk, got {fmt!r}")
    return path
