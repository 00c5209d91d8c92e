import os
import sys

# Tests import the `distributed` helper module from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny matmuls: one thread is much faster than two fighting over a busy 2-core machine, and
# distributed tests start several processes anyway.
torch.set_num_threads(1)
