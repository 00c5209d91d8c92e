"""A merged SMF model where Hugging Face tools go: transformers without smf-ds (trust_remote_code),
lm-evaluation-harness with the shipped task YAMLs, `smf-ds export` and its model card."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smf_ds.config import MemoryConfig
from smf_ds.data import samples
from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer
from smf_ds.memory.inject import inject_memory, value_tables
from smf_ds.memory.merged import PORTABLE_DIR, PORTABLE_FILES, load_merged, save_merged
from smf_ds.tokens import encode_starts

pytestmark = pytest.mark.e2e

# Runs in a fresh interpreter that cannot import smf_ds: what a user who downloaded the model has.
HF_ONLY = r'''
import importlib.abc, json, os, sys

class NoSMF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "smf_ds":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoSMF())
sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "smf_ds"))]
try:
    import smf_ds
    sys.exit("smf_ds is importable here")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM

job = json.load(open(sys.argv[1]))
out = {}
for name, case in job.items():
    r = out[name] = {}
    try:
        AutoModelForCausalLM.from_pretrained(case["dir"])
        r["without_trust"] = None
    except Exception as err:
        r["without_trust"] = f"{type(err).__name__}: {err}"
    model = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True, dtype=torch.float32).eval()
    ids, mask = torch.tensor(case["ids"]), torch.tensor(case["mask"])
    with torch.no_grad():
        r["logits"] = model(input_ids=ids, attention_mask=mask).logits.tolist()
        r["generated"] = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                          for p in case["prompts"]]
    model.save_pretrained(case["resave"])
    again = AutoModelForCausalLM.from_pretrained(case["resave"], trust_remote_code=True).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        r["resaved_logits"] = again(input_ids=ids, attention_mask=mask).logits.tolist()
        r["bf16_logits"] = bf16(input_ids=ids, attention_mask=mask).logits.float().tolist()
    r["bf16_dtypes"] = sorted({str(p.dtype) for n, p in bf16.named_parameters() if not n.endswith("values.weight")})
    r["bf16_values_dtype"] = sorted({str(p.dtype) for n, p in bf16.named_parameters() if n.endswith("values.weight")})
    r["class"] = type(model).__name__
json.dump(out, open(sys.argv[2], "w"))
'''


def _smf_model(arch: str, mode: str, tokenizer, hidden=32, layers=3, n_keys=8, seed=0):
    """A tiny base model with memory whose every tensor is moved off its init (a no-op load fails)."""
    model = build_tiny_model(tokenizer, arch=arch, hidden=hidden, layers=layers, init_std=0.2, seed=seed)
    cfg = MemoryConfig(layers=list(range(0, layers, 2)), n_keys=n_keys, heads=2, knn=4, k_dim=16, mode=mode,
                       scale_init=1.0, query_batchnorm=arch == "llama", seed=seed)
    inject_memory(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for _, table in value_tables(model):
        table.weight.add_(torch.randn(table.weight.shape, generator=g))
    return model.eval()


def _inputs(tokenizer):
    texts = ["Question: What is the capital?\nAnswer:", "The quick brown fox"]
    ids = encode_starts(tokenizer, texts)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    padded = [[pad] * (width - len(x)) + x for x in ids]  # left padding, as generation pads
    mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]
    return torch.tensor(padded), torch.tensor(mask), ids


def test_transformers_alone_loads_a_merged_model_right_or_refuses_it(tmp_path):
    """Qwen2 and Llama (BOS), additive and replacement: without smf-ds installed, from_pretrained with
    trust_remote_code gives smf-ds's logits (and not the base's), generate gives smf-ds eval's
    TriviaQA tokens, save_pretrained round-trips, bf16 keeps the value rows fp32; without
    trust_remote_code transformers refuses the directory."""
    from smf_ds.eval.triviaqa import cut_at_stop, generate_batched, stop_ids

    job, ours = {}, {}
    for arch, mode in (("qwen2", "additive"), ("llama", "replacement")):
        tok = build_tiny_tokenizer(["Question: What is the capital?\nAnswer: The city."], vocab_size=300,
                                   bos="<s>" if arch == "llama" else None)
        model = _smf_model(arch, mode, tok)
        save_merged(model, tmp_path / arch, tokenizer=tok)
        smf = load_merged(tmp_path / arch)
        ids, mask, prompts = _inputs(tok)
        with torch.no_grad():
            ours[arch] = {"logits": smf(input_ids=ids, attention_mask=mask).logits,
                          "bf16": load_merged(tmp_path / arch, dtype=torch.bfloat16)(
                              input_ids=ids, attention_mask=mask).logits.float(),
                          "generated": generate_batched(smf, tok, prompts, max_new_tokens=8),
                          "stop": stop_ids(smf, tok)}
            base = build_tiny_model(tok, arch=arch, hidden=32, layers=3, init_std=0.2, seed=0).eval()
            ours[arch]["base"] = base(input_ids=ids, attention_mask=mask).logits
        job[arch] = {"dir": str(tmp_path / arch), "resave": str(tmp_path / f"{arch}_resaved"),
                     "ids": ids.tolist(), "mask": mask.tolist(), "prompts": prompts}
    (tmp_path / "job.json").write_text(json.dumps(job))
    script = tmp_path / "hf_only.py"
    script.write_text(HF_ONLY)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                         cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    for arch, want in ours.items():
        got = theirs[arch]
        assert got["class"] == {"qwen2": "SMFQwen2ForCausalLM", "llama": "SMFLlamaForCausalLM"}[arch]
        assert got["without_trust"] and "trust_remote_code=True" in got["without_trust"]
        logits = torch.tensor(got["logits"])
        assert (logits - want["logits"]).abs().max() <= 1e-6
        assert (logits - want["base"]).abs().max() > 1e-2  # the memory is there
        assert torch.equal(torch.tensor(got["resaved_logits"]), logits)
        assert [cut_at_stop(g, want["stop"]) for g in got["generated"]] == want["generated"]
        assert got["bf16_dtypes"] == ["torch.bfloat16"] and got["bf16_values_dtype"] == ["torch.float32"]
        assert torch.equal(torch.tensor(got["bf16_logits"]), want["bf16"])


def test_the_portable_files_are_smf_ds_own_and_need_only_torch_and_transformers(tmp_path):
    """smf_ds.memory builds its layers from portable/product_keys.py, and a merged directory carries
    byte-identical copies of the portable files, which import nothing but torch, transformers, the
    standard library and each other."""
    from smf_ds.memory import layer
    from smf_ds.memory.portable import product_keys

    assert layer.ProductKeyMemory is product_keys.ProductKeyMemory
    tok = build_tiny_tokenizer(["a b c"], vocab_size=280)
    save_merged(_smf_model("qwen2", "additive", tok), tmp_path / "m")
    for name in PORTABLE_FILES:
        assert (tmp_path / "m" / name).read_bytes() == (PORTABLE_DIR / name).read_bytes()
        tree = ast.parse((PORTABLE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in {Path(f).stem for f in PORTABLE_FILES}, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for root in roots:
                    assert root.split(".")[0] in {"torch", "transformers", "functools", "__future__"}, (name, root)


# --- lm-evaluation-harness ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_size(tmp_path_factory):
    """A merged SMF model of the demo's size (Qwen2, 4 layers, hidden 64; memory at all 4 layers,
    64 x 64 slots, 4 heads, knn 8) with random weights, its data files, and smf-ds eval's records."""
    from smf_ds.cli import main

    root = tmp_path_factory.mktemp("lm_eval")
    texts = [r["question"] + " " + " ".join(r[k] for k in ("opa", "opb", "opc", "opd"))
             for r in samples.medmcqa_rows(60, seed=9)]
    texts += [r["question"] + " " + r["answer"]["value"] for r in samples.triviaqa_rows(40, seed=9)]
    texts += [f"Answer: {c}. {c}" for c in "ABCD"] * 50
    tok = build_tiny_tokenizer(texts, vocab_size=400)
    model = build_tiny_model(tok, hidden=64, layers=4, heads=4, kv_heads=2, init_std=0.2, seed=0)
    inject_memory(model, MemoryConfig(layers=[0, 1, 2, 3], n_keys=64, heads=4, knn=8, k_dim=32, scale_init=1.0))
    g = torch.Generator().manual_seed(5)
    for _, table in value_tables(model):
        table.weight.add_(torch.randn(table.weight.shape, generator=g))
    save_merged(model, root / "merged", tokenizer=tok)
    data = {"medmcqa": samples.write_rows(samples.medmcqa_rows(24, seed=1, multi_every=6), root / "medmcqa.jsonl"),
            "triviaqa": samples.write_rows(samples.triviaqa_rows(16, seed=1), root / "triviaqa.jsonl")}
    assert main(["eval", "--model", str(root / "merged"), "--tasks", "medmcqa,triviaqa", "--medmcqa",
                 str(data["medmcqa"]), "--triviaqa", str(data["triviaqa"]), "--out", str(root / "smf_eval"),
                 "--no-progress", "--n-boot", "10"]) == 0
    records = {task: [json.loads(line) for line in (root / "smf_eval" / f"{task}.predictions.jsonl").open()]
               for task in ("medmcqa", "triviaqa")}
    return root, {k: str(v) for k, v in data.items()}, records


TASKS = ("smf_medmcqa_letter", "smf_medmcqa_answer", "smf_triviaqa")


def _check_same_predictions(samples_by_task: dict, records: dict) -> None:
    for task, kind in (("smf_medmcqa_letter", "letter"), ("smf_medmcqa_answer", "answer")):
        got = sorted(samples_by_task[task], key=lambda s: s["doc_id"])
        assert len(got) == len(records["medmcqa"]) == 20  # the 4 'multi' rows left out by both
        for sample, rec in zip(got, records["medmcqa"]):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            assert max(abs(a - b) for a, b in zip(lls, rec[f"ll_{kind}"])) <= 1e-4
            assert "ABCD"[max(range(4), key=lls.__getitem__)] == rec[f"pred_{kind}"]
    got = sorted(samples_by_task["smf_triviaqa"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0].strip() for s in got] == [r["prediction"] for r in records["triviaqa"]]
    assert [s["contains"] for s in got] == [float(r["contains"]) for r in records["triviaqa"]]


def test_lm_eval_python_api_gives_smf_ds_eval_predictions(demo_size):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from smf_ds.eval import lm_eval_tasks

    root, data, records = demo_size
    manager = TaskManager(include_path=lm_eval_tasks.__path__[0], metadata=data)
    result = lm_eval.simple_evaluate(model="hf", tasks=list(TASKS), task_manager=manager, log_samples=True,
                                     model_args=f"pretrained={root / 'merged'},trust_remote_code=True,dtype=float32",
                                     device="cpu", batch_size=8)
    _check_same_predictions(result["samples"], records)


def test_lm_eval_command_gives_smf_ds_eval_predictions(demo_size, tmp_path):
    root, data, records = demo_size
    include = subprocess.run([sys.executable, "-m", "smf_ds.eval.lm_eval_tasks"], capture_output=True, text=True,
                             check=True).stdout.strip()
    lm_eval = Path(sys.executable).parent / "lm_eval"
    run = subprocess.run([str(lm_eval), "--model", "hf", "--model_args",
                          f"pretrained={root / 'merged'},trust_remote_code=True,dtype=float32",
                          "--tasks", ",".join(TASKS), "--include_path", include, "--metadata", json.dumps(data),
                          "--device", "cpu", "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    found = {task: [json.loads(line) for f in tmp_path.rglob(f"samples_{task}_*.jsonl") for line in f.open()]
             for task in TASKS}
    for sample in found["smf_medmcqa_letter"] + found["smf_medmcqa_answer"]:
        sample["filtered_resps"] = [[float(r[0])] for r in sample["filtered_resps"]]  # written as strings
    _check_same_predictions(found, records)


# --- smf-ds export -----------------------------------------------------------------------------


def test_export_writes_a_merged_model_with_a_card_and_refuses_what_it_cannot_do(tmp_path, capsys):
    from smf_ds.cli import main
    from smf_ds.config import SMFConfig, save_config
    from smf_ds.memory.adapter import save_memory_adapter

    tok = build_tiny_tokenizer(["a b c"], vocab_size=280)
    base = build_tiny_model(tok, hidden=32, layers=3, init_std=0.2, seed=0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = _smf_model("qwen2", "additive", tok)
    run = tmp_path / "run"
    save_memory_adapter(model, run / "memory_adapter")
    cfg = SMFConfig()
    cfg.model.name_or_path, cfg.sparse.scoring, cfg.sparse.top_t = "Qwen/Qwen2.5-0.5B-Instruct", "kl", 64
    save_config(cfg, run / "config.yaml")
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(
        {"tasks": {"medmcqa": {"metrics": {"accuracy_letter": {"value": 0.4062, "ci95": [0.3, 0.5], "n": 96}}}}}))

    argv = ["export", "--model", str(tmp_path / "base"), "--memory-adapter", str(run / "memory_adapter"),
            "--out", str(tmp_path / "merged")]
    assert main(argv) == 0
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5, 6]])
        assert torch.equal(load_merged(tmp_path / "merged")(input_ids=ids).logits, model(input_ids=ids).logits)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("---\n") and "base_model:" not in card  # --model is a local dir: no hub link
    assert f"`{tmp_path / 'base'}` with product-key memory layers. Finetuned by Sparse Memory Finetuning" in card
    assert "trust_remote_code=True" in card and "| `sparse.scoring` | kl |" in card and "| `sparse.top_t` | 64 |" in card
    assert "| `model.name_or_path` | Qwen/Qwen2.5-0.5B-Instruct |" in card and "retrofit.steps" not in card
    assert "| medmcqa | accuracy_letter | 96 | 0.4062 | [0.3, 0.5] |" in card
    assert "| slots per layer | 64 (8 x 8 product keys) |" in card
    assert "local_files_only" not in (tmp_path / "merged" / "tokenizer_config.json").read_text()

    def refused(*args) -> str:
        capsys.readouterr()
        assert main(["export", *args]) == 2
        return capsys.readouterr().err

    err = refused(*argv[1:])  # a second export into the same dir
    assert "--out" in err and "not empty" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 0  # an earlier export may be replaced
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert "not a merged model" in refused(*argv[1:-1], str(keep), "--overwrite")
    assert (keep / "notes.txt").read_text() == "mine"
    assert "holds --memory-adapter" in refused(*argv[1:-1], str(run), "--overwrite")
    assert (run / "memory_adapter").is_dir()
    assert "--memory-adapter" in refused("--model", str(tmp_path / "base"), "--out", str(tmp_path / "other"))
    assert "its memory adapter: " in refused("--model", str(tmp_path / "base"), "--memory-adapter", str(run),
                                             "--out", str(tmp_path / "other"))
    (tmp_path / "garbage.json").write_text("[1, 2]")
    assert "not an evaluation summary" in refused(*argv[1:-1], str(tmp_path / "other"), "--eval",
                                                  str(tmp_path / "garbage.json"))
    (tmp_path / "lora_eval").mkdir()
    (tmp_path / "lora_eval" / "summary.json").write_text(json.dumps(
        {"memory_adapter": None, "artifact": str(tmp_path / "lora"), "tasks": {}}))
    assert "not --memory-adapter" in refused(*argv[1:-1], str(tmp_path / "other"), "--eval",
                                             str(tmp_path / "lora_eval"))
    assert not (tmp_path / "other").exists()
