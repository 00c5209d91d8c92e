# Two commands a new user needs: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PEER   := $(VENV)/.peer-installed

# The machine's accelerator (cuda when torch sees a GPU, else cpu) unless DS_ACCELERATOR is set.
ifeq ($(origin DS_ACCELERATOR), undefined)
DS_ACCELERATOR := $(shell launch/accelerator.sh $(PY))
endif
export DS_ACCELERATOR
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo experiment continual test test-fast test-deps bench clean install-mpi

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: deepspeed's build imports it, so deepspeed is built without isolation.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q numpy setuptools wheel
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# The [peer] extra (FBGEMM, 6 MB): the peer test and the benchmarks' FBGEMM columns need it; a user's plain
# install stays without it.
$(PEER): $(STAMP)
	$(PIP) install -q -e '.[dev,peer]'
	touch $(PEER)

# OpenMPI from Debian plus mpi4py, for mpirun launches (needs root for apt-get).
install-mpi: $(STAMP)
	command -v mpicc >/dev/null || (apt-get update -qq && apt-get install -y -qq libopenmpi-dev openmpi-bin)
	$(PIP) install -q -e '.[mpi]'

demo: $(STAMP)
	$(PY) -m smf_ds.cli demo --out runs/demo

# Every method x 3 seeds on the synthetic world, with smf-tfidf's value lr and LoRA's and full's lr
# swept, and the paper code's procedure with one correction per difference (--ablation): paired
# intervals, frontiers, matched-gain and ablation tables, a plot, a report.
experiment: $(STAMP)
	$(PY) -m smf_ds.cli experiment --sweep --ablation --jobs 2 --out runs/experiment

# Lin et al.'s continual setting: the world's task dealt into 4 tasks, learned one after another by
# smf-tfidf, LoRA and full finetuning (3 seeds); forgetting curves after every task.
continual: $(STAMP)
	$(PY) -m smf_ds.cli continual --out runs/continual

# Everything (the README's and CI's command), with what the launcher and cluster tests need
# installed first (root Debian machines); a skipped test fails it. The 15 slowest are listed.
# TEST_WORKERS pytest processes share the tests (many of them wait on launchers and timeouts);
# the tests of the one test cluster run in one of them (xdist group "cluster").
TEST_WORKERS ?= 3
test: $(STAMP) $(PEER) test-deps
	SMF_NO_SKIPS=1 $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup tests

# OpenMPI, slurm-wlm + munge, iproute2 from Debian (needs root; says what is missing otherwise).
test-deps:
	launch/install_test_deps.sh

# The tier without process groups (dist) or subprocess end-to-end runs (e2e): well under a minute.
test-fast: $(STAMP) $(PEER)
	$(PY) -m pytest -q -m "not dist and not e2e" tests

# Benchmarks (not tests): each prints a table and writes JSON under bench_results/ (~10 min in all).
bench: $(STAMP) $(PEER)
	$(PY) tools/bench_sparse_step.py --out bench_results/sparse_step.json
	$(PY) tools/bench_memory.py --out bench_results/memory.json
	$(PY) tools/bench_eval.py --out bench_results/eval.json

clean:
	rm -rf $(VENV) runs bench_results
