from glob import glob

from setuptools import find_packages, setup

# The DeepSpeed templates stay at the top of the tree (ds_configs/), outside the package; a
# regular install gets them under <prefix>/share/smf-ds/ds_configs (smf_ds/train/ds_config.py).
DS_CONFIGS = sorted(glob("ds_configs/*.json"))
if not DS_CONFIGS:
    raise SystemExit("setup.py: no ds_configs/*.json here; run it from the project root")

setup(
    name="smf-ds",
    version="0.1.0",
    description="Sparse Memory Finetuning of language models on DeepSpeed",
    packages=find_packages(include=["smf_ds", "smf_ds.*"]),
    data_files=[("share/smf-ds/ds_configs", DS_CONFIGS)],
    package_data={"smf_ds.eval.lm_eval_tasks": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # 2.13.0 has a CPU wheel on our GPU-less machines; on a CUDA box the same pin gets the CUDA build.
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "peft>=0.17",
        "tensorboard>=2.15",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        "mpi": ["mpi4py>=4.0"],
        # FBGEMM's table-batched embedding, the industrial peer of our value lookup in tests/test_fbgemm_peer.py
        # and tools/bench_*.py. 1.8.0 is the release its compatibility table pairs with torch 2.13 (1.9 needs
        # 2.14); the CPU build, since our pinned torch is the CPU wheel here (a CUDA box wants fbgemm-gpu==1.8.0).
        "peer": ["fbgemm-gpu-cpu==1.8.0"],
        # lm-eval: the tests run its harness on merged SMF models (0.4.13 works with our torch and transformers).
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "lm-eval==0.4.13"],
    },
    entry_points={"console_scripts": ["smf-ds=smf_ds.cli:main"]},
)
