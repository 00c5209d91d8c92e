#!/usr/bin/env python
"""Throughput of our batched evaluators vs a per-example loop written the way the paper's code evaluates.

Both run on the same tiny model and the same data, in this process, with the same prompts,
tokenization and metric code (smf_ds.eval.reference holds the paper-style loops):

  medmcqa   ours: all options of many questions per forward (letter: one row per question),
            left-padded, only the needed logits; paper: one forward per option per question
            (modes letter + answer + answer_norm = 8 forwards per question), full logits.
  triviaqa  ours: greedy `generate` over left-padded batches with a per-row newline stop;
            paper: one unbatched `generate` per question (same greedy config and stop).
  wikitext  ours: several strided windows per forward, logits of the scored positions only;
            paper: the HF-guide loop, one window per forward.

Data: seeded rows in the hub schemas (smf_ds.data.samples) written to local files and read back
through the loaders. Model: a byte-level BPE tokenizer trained on that data and a random Qwen2
(smf_ds.data.tiny), saved with save_pretrained and loaded back with AutoModelForCausalLM, fp32.

Each task: one untimed warm-up of both paths on a few examples, then --repeats timed runs of
each path, alternating; the median time is reported. The check that predictions are identical
(MedMCQA: every mode's prediction per question, log-likelihoods within 1e-4; TriviaQA: the
generated tokens; WikiText: the windows, per-token NLL within 1e-5, perplexity within 1e-5
relative) is printed and stored. Goals (printed as PASS/MISS, not asserted): at least 10x for
MedMCQA and TriviaQA, 3x for WikiText.

    .venv/bin/python tools/bench_eval.py --out bench_results/eval.json
    .venv/bin/python tools/bench_eval.py --n 32 --repeats 1           # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from smf_ds.data import samples  # noqa: E402
from smf_ds.data.medmcqa import load_medmcqa  # noqa: E402
from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from smf_ds.data.triviaqa import load_triviaqa  # noqa: E402
from smf_ds.data.wikitext import join_docs, load_wikitext  # noqa: E402
from smf_ds.eval import reference  # noqa: E402
from smf_ds.eval.medmcqa import MODES, evaluate_medmcqa  # noqa: E402
from smf_ds.eval.triviaqa import evaluate_triviaqa  # noqa: E402
from smf_ds.eval.wikitext import evaluate_perplexity, make_windows, summarize_perplexity  # noqa: E402

GOALS = {"medmcqa": 10.0, "triviaqa": 10.0, "wikitext": 3.0}


def build(args, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = {
        "medmcqa": samples.write_rows(samples.medmcqa_rows(args.n, seed=11), workdir / "medmcqa.jsonl"),
        "triviaqa": samples.write_rows(samples.triviaqa_rows(args.n, seed=11), workdir / "triviaqa.jsonl"),
        "wikitext": samples.write_rows(samples.wikitext_rows(args.wiki_articles, seed=11), workdir / "wikitext.jsonl"),
    }
    texts = [json.dumps(r) for p in paths.values() for r in map(json.loads, p.read_text().splitlines())]
    texts += [f"Answer: {c}. {c}" for c in "ABCD"] * 50
    tok = build_tiny_tokenizer(texts, vocab_size=args.vocab)
    build_tiny_model(tok, workdir / "model", hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2,
                     max_positions=max(1024, args.max_length), seed=0)
    tok = AutoTokenizer.from_pretrained(str(workdir / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype=torch.float32).to(args.device).eval()
    return model, tok, paths


def run_pair(name, ours, paper, n_items, repeats):
    ours(warm=True)
    paper(warm=True)
    ours_times, paper_times, ours_out, paper_out = [], [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        paper_out = paper()
        paper_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours_out = ours()
        ours_times.append(time.perf_counter() - t0)
    o, p = statistics.median(ours_times), statistics.median(paper_times)
    return ours_out, paper_out, {"task": name, "n": n_items, "ours_s": o, "paper_s": p,
                                 "ours_per_s": n_items / o, "paper_per_s": n_items / p, "speedup": p / o,
                                 "ours_times": ours_times, "paper_times": paper_times,
                                 "goal": GOALS[name], "meets_goal": p / o >= GOALS[name]}


def bench_medmcqa(model, tok, path, args):
    examples, _ = load_medmcqa(str(path))
    warm_ex = examples[:4]
    ours = lambda warm=False: evaluate_medmcqa(model, tok, warm_ex if warm else examples, modes=MODES,  # noqa: E731
                                               batch_size=args.batch_size)
    paper = lambda warm=False: reference.medmcqa_one_by_one(model, tok, warm_ex if warm else examples,  # noqa: E731
                                                            modes=MODES)
    a, b, row = run_pair("medmcqa", ours, paper, len(examples), args.repeats)
    same = all(x[f"pred_{m}"] == y[f"pred_{m}"] for x, y in zip(a, b) for m in MODES) and len(a) == len(b)
    diff = max(float(np.max(np.abs(np.subtract(x[f"ll_{k}"], y[f"ll_{k}"])))) for x, y in zip(a, b)
               for k in ("letter", "answer"))
    row.update(identical=bool(same and diff <= 1e-4), max_abs_ll_diff=diff, unit="questions",
               forwards_paper=8 * len(examples),
               accuracy={m: float(np.mean([x[f"correct_{m}"] for x in a])) for m in MODES})
    return row


def bench_triviaqa(model, tok, path, args):
    examples, _ = load_triviaqa(str(path))
    warm_ex = examples[:2]
    ours = lambda warm=False: evaluate_triviaqa(model, tok, warm_ex if warm else examples,  # noqa: E731
                                                max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size)
    paper = lambda warm=False: reference.triviaqa_one_by_one(model, tok, warm_ex if warm else examples,  # noqa: E731
                                                             max_new_tokens=args.max_new_tokens)
    a, b, row = run_pair("triviaqa", ours, paper, len(examples), args.repeats)
    row.update(identical=a == b, unit="questions",
               mean_generated_tokens=float(np.mean([len(x["tokens"]) for x in a])))
    return row


def bench_wikitext(model, tok, path, args):
    docs, _ = load_wikitext(str(path))
    text = join_docs(docs)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    warm_ids = ids[:2 * args.max_length]
    kw = dict(max_length=args.max_length, stride=args.stride)
    ours = lambda warm=False: evaluate_perplexity(model, tok, ids=warm_ids if warm else ids,  # noqa: E731
                                                  batch_size=args.ppl_batch_size, **kw)
    paper = lambda warm=False: reference.perplexity_one_by_one(model, tok, ids=warm_ids if warm else ids, **kw)  # noqa: E731
    n_windows = len(make_windows(len(ids), args.max_length, args.stride))
    a, b, row = run_pair("wikitext", ours, paper, n_windows, args.repeats)
    per_tok = max(abs(x["nll"] / x["n_tokens"] - y["nll"] / y["n_tokens"]) for x, y in zip(a, b))
    pa = summarize_perplexity(a, n_boot=10)["perplexity"]["value"]
    pb = summarize_perplexity(b, n_boot=10)["perplexity"]["value"]
    same_windows = [(x["begin"], x["end"]) for x in a] == [(y["begin"], y["end"]) for y in b]
    row.update(identical=bool(same_windows and per_tok <= 1e-5 and abs(pa / pb - 1) <= 1e-5), unit="windows",
               max_abs_nll_per_token_diff=per_tok, perplexity_ours=pa, perplexity_paper=pb, n_tokens=len(ids),
               tokens_per_s_ours=len(ids) / row["ours_s"], tokens_per_s_paper=len(ids) / row["paper_s"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="MedMCQA and TriviaQA questions")
    p.add_argument("--wiki-articles", type=int, default=40)
    p.add_argument("--tasks", default="medmcqa,triviaqa,wikitext")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (both paths)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=32, help="as the tests' tiny model")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gen-batch-size", type=int, default=64)
    p.add_argument("--ppl-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, paths = build(args, Path(tmp))
        rows = []
        benches = {"medmcqa": bench_medmcqa, "triviaqa": bench_triviaqa, "wikitext": bench_wikitext}
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            rows.append(benches[task](model, tok, paths[task], args))
            r = rows[-1]
            print(f"{task}: ours {r['ours_s']:.3f}s, paper-style {r['paper_s']:.3f}s, {r['speedup']:.1f}x, "
                  f"identical={r['identical']}", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
    header = f"{'task':<9} {'n':>6} {'unit':<9} {'ours/s':>9} {'paper/s':>9} {'speedup':>8} {'goal':>5} {'identical':>9}"
    print(f"\nDevice: {device}; model: random Qwen2, hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}, fp32")
    print(header)
    for r in rows:
        print(f"{r['task']:<9} {r['n']:>6} {r['unit']:<9} {r['ours_per_s']:>9.1f} {r['paper_per_s']:>9.1f} "
              f"{r['speedup']:>7.1f}x {r['goal']:>4.0f}x {str(r['identical']):>9}  "
              f"{'PASS' if r['meets_goal'] else 'MISS'}")
    result = {"device": device, "torch": torch.__version__, "threads": args.threads,
              "model": {"arch": "qwen2", "hidden": args.hidden, "layers": args.layers, "vocab": len(tok), "dtype": "float32"},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "tasks": {r["task"]: r for r in rows}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
