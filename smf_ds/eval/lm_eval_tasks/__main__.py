"""`python -m smf_ds.eval.lm_eval_tasks` prints this folder, for lm_eval's --include_path."""
from pathlib import Path

print(Path(__file__).resolve().parent)
