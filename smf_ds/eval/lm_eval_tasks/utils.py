"""smf-ds's three evaluations as lm-evaluation-harness tasks: the same rows (smf-ds's loaders, malformed
rows left out as `smf-ds eval` leaves them), the same prompts and continuations, the same TriviaQA
metrics. Data from a hub id or a local file in the hub schema, named in lm_eval's --metadata:

    lm_eval --model hf --model_args pretrained=MERGED_DIR,trust_remote_code=True \\
        --include_path "$(python -m smf_ds.eval.lm_eval_tasks)" \\
        --tasks smf_medmcqa_letter,smf_medmcqa_answer,smf_triviaqa,smf_wikitext \\
        --metadata '{"medmcqa": "medmcqa.jsonl", "triviaqa": "triviaqa.jsonl", "wikitext": "wikitext.jsonl"}'

Metadata keys (each optional): medmcqa, medmcqa_split, triviaqa, triviaqa_config, triviaqa_split,
wikitext, wikitext_config, wikitext_split; defaults as `smf-ds eval`'s flags.
Not the same as smf-ds: lm-eval tokenizes context + continuation together and splits them after,
and adds no BOS for most models (smf-ds adds the tokenizer's start tokens, e.g. Llama's BOS);
smf_wikitext is lm-eval's rolling-window word/byte perplexity per article, not smf-ds's strided
token perplexity over the joined text.
"""
from __future__ import annotations

import datasets

from smf_ds.data import medmcqa as medmcqa_data
from smf_ds.data import triviaqa as triviaqa_data
from smf_ds.data import wikitext as wikitext_data
from smf_ds.eval.triviaqa import contains_match, exact_match, token_f1

SPLIT = "eval"  # the one split each task's dataset has (test_split in the YAMLs)
PROMPT = medmcqa_data.MedMCQAPrompt()


def _split(docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(docs)})


def load_medmcqa(medmcqa: str = medmcqa_data.HUB_ID, medmcqa_split: str = medmcqa_data.DEFAULT_SPLIT,
                 **_) -> datasets.DatasetDict:
    examples, _report = medmcqa_data.load_medmcqa(medmcqa, split=medmcqa_split)
    return _split([{"id": ex.id or "", "row": ex.row, "question": ex.question, "options": ex.options,
                    "cop": ex.answer} for ex in examples])


def _example(doc: dict) -> medmcqa_data.MedMCQAExample:
    return medmcqa_data.MedMCQAExample(index=0, row=doc["row"], id=doc["id"], question=doc["question"],
                                       options=list(doc["options"]), answer=doc["cop"])


def medmcqa_prompt(doc: dict) -> str:
    return PROMPT.prompt(_example(doc))


def medmcqa_answers(doc: dict) -> list[str]:
    """The four 'answer' continuations without their leading space (lm-eval's target_delimiter adds it)."""
    return [PROMPT.continuation(_example(doc), option, "answer")[1:] for option in range(4)]


def load_triviaqa(triviaqa: str = triviaqa_data.HUB_ID, triviaqa_split: str = triviaqa_data.DEFAULT_SPLIT,
                  triviaqa_config: str | None = triviaqa_data.HUB_CONFIG, **_) -> datasets.DatasetDict:
    examples, _report = triviaqa_data.load_triviaqa(triviaqa, split=triviaqa_split, config=triviaqa_config)
    return _split([{"id": ex.id or "", "row": ex.row, "question": ex.question, "references": ex.aliases}
                   for ex in examples])


def triviaqa_prompt(doc: dict) -> str:
    return triviaqa_data.DEFAULT_TEMPLATE.format(question=doc["question"])


def triviaqa_results(doc: dict, results: list[str]) -> dict:
    prediction = results[0].strip()
    refs = doc["references"]
    return {"contains": float(contains_match(prediction, refs)), "em": float(exact_match(prediction, refs)),
            "f1": token_f1(prediction, refs)}


def load_wikitext(wikitext: str = wikitext_data.HUB_ID, wikitext_split: str = wikitext_data.DEFAULT_SPLIT,
                  wikitext_config: str | None = wikitext_data.HUB_CONFIG, **_) -> datasets.DatasetDict:
    docs, _report = wikitext_data.load_wikitext(wikitext, split=wikitext_split, config=wikitext_config)
    return _split([{"row": d.row, "text": wikitext_data.join_docs([d])} for d in docs])


def wikitext_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words, n_bytes = len(doc["text"].split()), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
