#!/usr/bin/env bash
# Prints the DeepSpeed accelerator this machine has: cuda when torch sees a GPU, else cpu.
#   launch/accelerator.sh [PYTHON]     (PYTHON: the interpreter with torch; default python3)
# Without that interpreter (before `make install`) a working nvidia-smi counts as a GPU.
python=${1:-python3}
if found=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null); then
  echo "$found"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo cuda
else
  echo cpu
fi
