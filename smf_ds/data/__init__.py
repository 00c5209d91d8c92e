"""Datasets in their hub schemas, from an HF hub id or a local file.

loading      hub id / .jsonl / .json / .parquet / save_to_disk dir -> rows; limit + seeded subsample
validation   malformed-row reports (row, field, problem); strict mode raises
medmcqa      MedMCQA rows -> examples; the prompt template (training and evaluation)
triviaqa     TriviaQA rc.nocontext rows -> questions with all reference answers
wikitext     WikiText raw lines -> articles; the text perplexity is measured on
oasst        OASST1 top-ranked English assistant replies (general text)
samples      small seeded rows in exactly those schemas (tests, benchmarks, demos)
tiny         an offline byte-level BPE tokenizer and a tiny Qwen2/Llama, saved with save_pretrained
"""
