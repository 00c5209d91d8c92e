"""Batched evaluators, sharded over ranks with results identical to one process.

medmcqa      accuracy by option log-likelihood (letter / answer / answer_norm)
wikitext     strided perplexity
triviaqa     greedy generation; alias-contains, exact match, token F1
scoring      the batched log-likelihood engines (independent pairs; shared contexts on a KV cache)
batching     padding, batch plans, sharding batches over ranks, gathering
bootstrap    seeded percentile-bootstrap 95% intervals
reference    one-example-at-a-time loops the paper's way (tests and tools/bench_eval.py)
runner       load + check data, evaluate, summarize, write JSONL / summary.json
cli          `smf-ds eval` (add_eval_arguments, run_eval, main)
"""
