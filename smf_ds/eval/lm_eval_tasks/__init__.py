"""lm-evaluation-harness task files for smf-ds's evaluations (utils.py says how to run them)."""
