#!/usr/bin/env python
"""What an SMF step costs at Qwen2.5-0.5B's size, and where its time goes.

    tools/bench_smf_overhead.py                      # CPU, fp32: every method at 16k slots, SMF at 16k/262k/1M row-sharded x 2
    tools/bench_smf_overhead.py --device cuda        # a GPU, bf16: every method, SMF at every size (one process, local tables)
    tools/bench_smf_overhead.py --quick              # Qwen's depth at hidden 64, vocab 2,048, tiny tables, one step

The backbone is Qwen2.5-0.5B-Instruct's shape with random weights (tools/rehearse_qwen_shape.py's
config; nothing is downloaded), memory at layers 6, 12, 18 with the paper's settings (4 heads, knn
16, k_dim 256, v_dim = hidden, gated, additive; SMF: kl scoring against synthetic background stats,
top-t 512, SGD at value_lr 2.0). Every method sees the same tokens (micro-batch x length, labels =
inputs), one optimizer step per micro-batch:

  backbone       no memory; the loss's backward runs down to layer 6's MLP output, where the first
                 memory layer would be: the part of the backward an SMF step pays for
  frozen-memory  memory injected, nothing trains; the same backward
  smf            SMF, scope `values` (the value rows alone, through the sparse updater)
  smf-memory     SMF, scope `memory` (values + the memory's dense params, AdamW)
  lora           peft LoRA r=16 on every projection (AdamW)
  full           every parameter (AdamW)

Each step is split into: the backbone's forward and backward (the rest of each), the memory's
forward (the product-key layers, with a sharded table's all-to-alls) and backward (the autograd
nodes the memory layers made, timed one by one with node hooks), selection (read counting, scores,
top-t), the update (the selected rows' gradients, in the JSON also alone as row_grads_s; SGD, norm,
bookkeeping) and the dense optimizer. The timers are hooks and wrappers installed by this script;
the library runs unchanged. A run reports its median step (of an even number, the slower middle
one) and that step's parts. On a loaded machine, --side-by-side runs the one-process methods two at
a time (one thread each), so that the two of a pair meet the same load.

Table sizes past 16k run SMF alone (the other methods do not depend on the table): on the CPU
row-sharded over 2 processes (`memory.sharding=row`, gloo, data-parallel, one thread each, the
micro-batch split between them: the same tokens per step; 16k is run the same way as the
like-for-like reference), on a GPU as local tables in one process. A run whose estimated memory
exceeds what /proc/meminfo says is available is skipped and says so (--layers 12 runs one memory
layer, as Lin et al. did at 1M slots, when three do not fit).
Writes JSON (default bench_results/smf_overhead.json) and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench_common  # noqa: E402
from rehearse_qwen_shape import QUICK, QWEN_0_5B  # noqa: E402

METHODS = ("backbone", "frozen-memory", "smf", "smf-memory", "lora", "full")
MEMORY_METHODS = ("frozen-memory", "smf", "smf-memory")
TRAINS_MEMORY = ("smf", "smf-memory")
MEMORY_LAYERS = [6, 12, 18]
N_KEYS = {"16k": 128, "262k": 512, "1M": 1024}  # slots = n_keys ** 2
QUICK_N_KEYS = {"256": 16, "1k": 32}
PARTS = ("backbone_fwd", "backbone_bwd", "mem_fwd", "mem_bwd", "select", "update", "dense_opt")
MEMORY_PARTS = ("mem_fwd", "mem_bwd", "select", "update")
GIB = 2**30


# --- timers ------------------------------------------------------------------------------------

class StepTimers:
    """Wall-clock pieces of one step. Memory forward: the product-key layers' forward hooks;
    memory backward: every autograd node those forwards created (found by the thread's node
    sequence numbers, which increase as nodes are made), plus the gradient accumulation of the
    memory's parameters, timed one node at a time; selection and updates: wrappers around the
    sparse step's own functions. On a GPU each reading synchronises first."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.t: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.handles: list = []
        self.nodes: list[str] = []  # the backward nodes timed as the memory's, by type
        self.active = True  # off: the wrappers call straight through
        self._node_start = 0.0

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.nodes.clear()
        self.t.clear()
        self.calls.clear()

    def wrap(self, module, name: str, part: str):
        """Replace module.name by a timed twin (returns the original, to put back)."""
        original = getattr(module, name)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            t0 = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(part, self.now() - t0)

        setattr(module, name, timed)
        return original

    def watch_memory(self, memory_module, params: set[int]) -> None:
        """Time a ProductKeyMemory's forward, and every backward node it makes."""
        import torch

        def seq() -> int:  # the next autograd node's sequence number (this makes one node)
            with torch.enable_grad():
                return (torch.ones((), requires_grad=True) * 1.0).grad_fn._sequence_nr()

        state = {}

        def pre(module, args, kwargs):
            state["lo"] = seq() if torch.is_grad_enabled() else None
            state["t0"] = self.now()

        def post(module, args, kwargs, output):
            self.add("mem_fwd", self.now() - state["t0"])
            if state["lo"] is not None and output.grad_fn is not None:
                self._hook_nodes(output.grad_fn, state["lo"], seq(), params)

        self.handles.append(memory_module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(memory_module.register_forward_hook(post, with_kwargs=True))

    def _hook_nodes(self, root, lo: int, hi: int, params: set[int]) -> None:
        def inside(node) -> bool:
            if type(node).__name__ == "AccumulateGrad":
                return id(node.variable) in params
            return lo < node._sequence_nr() < hi

        def start(*_):
            self._node_start = self.now()

        def stop(*_):
            self.add("mem_bwd", self.now() - self._node_start)

        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen or not inside(node):
                continue
            seen.add(id(node))
            self.nodes.append(type(node).__name__)
            # Node hooks live as long as the graph (AccumulateGrad nodes longer): removed after the step.
            self.handles.append(node.register_prehook(start))
            self.handles.append(node.register_hook(stop))
            todo.extend(fn for fn, _ in node.next_functions)


# --- one run: a method at one table size, in this process ---------------------------------------

def build_backbone(a, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**(QWEN_0_5B | QUICK if a.quick else QWEN_0_5B))
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_memory(model, n_keys: int, layers: list[int], group, device: str, seed: int):
    """The paper's memory with n_keys ** 2 slots per layer; tables row-sharded over `group` if given.

    A table too large to build whole in every process (smf_ds builds the whole table, then shards)
    is made directly in its final layout: the layers are injected small, then each gets keys and
    a value table (or this rank's row shard) of the real size, from build_memory's distributions."""
    import torch
    from torch import nn

    from smf_ds.config import MemoryConfig
    from smf_ds.memory.inject import inject_memory, memory_layers
    from smf_ds.memory.values import LocalValueTable
    from smf_ds.parallel.shard import shard_memory
    from smf_ds.parallel.sharded_values import RowShardedValueTable, even_split

    built_whole = n_keys <= N_KEYS["16k"]
    cfg = MemoryConfig(layers=layers, n_keys=n_keys if built_whole else 16)
    inject_memory(model, cfg)
    if built_whole:
        if group is not None:
            shard_memory(model, group, "row")
        return model
    rows = n_keys * n_keys
    rank = 0 if group is None else group.rank()
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)  # row shards differ by rank
    for _, mlp in memory_layers(model):
        mem = mlp.memory
        half, dim = mem.half_dim, mem.v_dim
        keys = torch.empty(mem.heads, 2, n_keys, half, device=device).uniform_(-half ** -0.5, half ** -0.5,
                                                                                   generator=generator)
        mem.keys = nn.Parameter(keys.to(mem.keys.dtype), requires_grad=False)
        mem.n_keys = n_keys
        if group is None:
            weight = torch.empty(rows, dim, device=device).normal_(0.0, dim ** -0.5, generator=generator)
            mem.values = LocalValueTable(rows, dim, weight=weight)
        else:
            import torch.distributed as dist

            sizes = even_split(rows, dist.get_world_size(group))
            local = torch.empty(sizes[dist.get_rank(group)], dim, device=device)
            local.normal_(0.0, dim ** -0.5, generator=generator)
            mem.values = RowShardedValueTable(rows, dim, local, sizes, group)
    model.smf_memory_config = MemoryConfig(layers=layers, n_keys=n_keys)
    return model


def synthetic_background(tables, batches: int, seed: int):
    """Background stats over `batches` batches: per row a document frequency and a count."""
    import torch

    from smf_ds.sparse.background import BackgroundStats

    g = torch.Generator().manual_seed(seed)
    stats = BackgroundStats.empty(tables)
    stats.num_batches = batches
    for layer, table in tables:
        stats.df[layer] = torch.randint(0, batches + 1, (table.num_rows,), generator=g)
        stats.counts[layer] = stats.df[layer] * torch.randint(1, 5, (table.num_rows,), generator=g)
    return stats


def anchor_at(model, layer: int) -> None:
    """The frozen references' backward: the output of decoder layer `layer`'s MLP requires grad,
    so the loss's backward runs from the top down to it (where an SMF step's backward ends)."""
    def hook(module, args, output):
        return output if output.requires_grad else output.detach().requires_grad_()

    model.model.layers[layer].mlp.register_forward_hook(hook)


def prepare(method: str, model, a, device: str):
    """(model, dense optimizer or None, SMF updater or None) for `method`."""
    import torch

    from smf_ds.config import SMFConfig, SparseConfig
    from smf_ds.memory.inject import set_train_scope, value_tables
    from smf_ds.sparse.step import SparseMemoryUpdater
    from smf_ds.train.methods import METHODS as TRAIN_METHODS

    cfg = SMFConfig()
    updater, params = None, []
    if method in ("backbone", "frozen-memory"):
        anchor_at(model, min(a.layers))
        for p in model.parameters():  # injected memory layers come trainable
            p.requires_grad_(False)
        if method == "frozen-memory":
            for _, table in value_tables(model):
                table.requires_grad = False
    elif method in TRAINS_MEMORY:
        params = set_train_scope(model, "values" if method == "smf" else "memory")
        tables = value_tables(model)
        world = tables[0][1].row_group.size() if tables[0][1].row_group is not None else 1
        sparse = SparseConfig(scoring="kl", top_t=min(512, tables[0][1].num_rows))
        updater = SparseMemoryUpdater(tables, sparse, cfg.memory.value_lr, synthetic_background(tables, 1000, a.seed),
                                      grad_divisor=world)
    else:
        model, params = TRAIN_METHODS[method].trainable(model, cfg)  # lora: r=16 on every projection
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None  # ds_configs' AdamW
    return model, optimizer, updater


def tokens_for(a, step: int, rank: int, vocab: int, device: str):
    """This rank's rows of the step's batch: a sharded run's ranks together see a one-process run's tokens."""
    import torch

    g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
    batch = torch.randint(0, vocab, (a.batch * a.procs, a.seq_len), generator=g)
    return batch[rank * a.batch:(rank + 1) * a.batch].to(device)


def run_one(a, method: str, n_keys: int | None, device: str, group=None) -> dict:
    """Warm-up and timed steps of one method; the median step and its split."""
    import torch

    import smf_ds.memory.values as values_mod
    import smf_ds.parallel.sharded_values as sharded_mod
    import smf_ds.sparse.step as step_mod
    from smf_ds.memory.inject import memory_layers

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rank = group.rank() if group is not None else 0
    t_build = time.perf_counter()
    model = build_backbone(a, device, dtype)
    vocab = model.config.vocab_size
    if method in MEMORY_METHODS:
        add_memory(model, n_keys, a.layers, group, device, a.seed)
    model, optimizer, updater = prepare(method, model, a, device)
    model.train()
    build_s = time.perf_counter() - t_build

    timers = StepTimers(device)
    memory_params = {id(p) for _, mlp in memory_layers(model) for p in mlp.memory.parameters()} \
        if method in MEMORY_METHODS else set()
    # Whichever way the step forms the selected rows' gradients (formed, then the optimizer; or SGD
    # straight from the sink), "row_grads" times it, within "update".
    wrapped = [(step_mod, "step_access", "select"), (step_mod, "select_rows", "select"), (step_mod, "step_grad", "row_grads"),
               (values_mod.RowGradSink, "sgd_update", "row_grads"), (values_mod, "read_counts", "counting"),
               (sharded_mod, "read_counts", "counting")]
    originals = [(owner, name, timers.wrap(owner, name, part)) for owner, name, part in wrapped if hasattr(owner, name)]

    def one_step(step: int, timed: bool = True) -> dict:
        timers.reset()
        timers.active = timed
        if timed and method in MEMORY_METHODS:
            for _, mlp in memory_layers(model):
                timers.watch_memory(mlp.memory, memory_params)
        ids = tokens_for(a, step, rank, vocab, device)
        t0 = timers.now()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        t1 = timers.now()
        loss.backward()
        t2 = timers.now()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t3 = timers.now()
        if updater is not None:
            updater.step()
        t4 = timers.now()
        got = dict(timers.t)
        if timed and updater is not None and not (timers.calls.get("select") and timers.calls.get("row_grads")):
            raise SystemExit("bench_smf_overhead: the SMF step ran without calling select_rows and step_grad or "
                             "RowGradSink.sgd_update, which this benchmark times: update its wrappers")
        timers.reset()
        parts = {"backbone_fwd": (t1 - t0) - got.get("mem_fwd", 0.0), "backbone_bwd": (t2 - t1) - got.get("mem_bwd", 0.0),
                 "mem_fwd": got.get("mem_fwd", 0.0), "mem_bwd": got.get("mem_bwd", 0.0),
                 "select": got.get("select", 0.0), "update": (t4 - t3) - got.get("select", 0.0), "dense_opt": t3 - t2}
        if updater is None:  # what lies between the last two readings is the dense optimizer's
            parts["update"], parts["dense_opt"] = 0.0, t4 - t2
        return {"step_s": t4 - t0, "parts_s": parts, "counting_s": got.get("counting", 0.0),
                "row_grads_s": got.get("row_grads", 0.0), "loss": float(loss.detach())}

    try:
        for step in range(a.warmup):
            one_step(step)
        gc.collect()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            bench_common.reset_hwm()
        rss_before = bench_common.proc_status("VmRSS") if device == "cpu" else torch.cuda.memory_allocated()
        steps = [one_step(a.warmup + i) for i in range(a.steps)]
        peak = bench_common.proc_status("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated()
        # On a GPU the timers synchronise at every memory node: the step's own time comes from steps
        # without them. On the CPU they cost microseconds a step, and the timed steps serve.
        plain = [one_step(a.warmup + a.steps + i, timed=False)["step_s"] for i in range(a.steps)] \
            if device == "cuda" else None
        profile = profile_step(one_step, a.warmup + a.steps) if method in a.profile else None
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    median = sorted(steps, key=lambda s: s["step_s"])[len(steps) // 2]
    out = {"method": method, "n_keys": n_keys, "slots_per_layer": n_keys * n_keys if n_keys else None,
           "rank": rank, "procs": group.size() if group is not None else 1, "build_s": build_s,
           "step_s": statistics.median(plain) if plain else median["step_s"], "timed_step_s": median["step_s"],
           "step_s_all": plain or [s["step_s"] for s in steps],
           "parts_s": median["parts_s"], "counting_s": median["counting_s"], "row_grads_s": median["row_grads_s"],
           "tokens_per_step": a.batch * a.seq_len, "loss": median["loss"],
           "memory_kind": "rss" if device == "cpu" else "cuda_allocated",
           "memory_before_steps_bytes": rss_before, "peak_memory_bytes": peak,
           "trainable_dense_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if profile is not None:
        out["profile_top_ops"] = profile
    return out


def profile_step(one_step, step: int, top: int = 25) -> list[dict]:
    """One more step under torch.profiler: the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(step)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]


def worker(a) -> None:
    import json

    import torch

    torch.set_num_threads(a.threads)
    group = None
    if a.procs > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.procs)
        group = dist.group.WORLD
    results = []
    for method, n_keys in a.runs:
        results.append(run_one(a, method, n_keys, a.device, group))
        gc.collect()  # the last run's model and its hooks' cycles, before the next one is built
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    print("RESULT " + json.dumps({"runs": results, "threads": torch.get_num_threads(), "torch": torch.__version__}),
          flush=True)


# --- driver --------------------------------------------------------------------------------------

def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def estimate_bytes(a, method: str, n_keys: int | None, procs: int) -> int:
    """A generous guess of a run's peak resident memory on the CPU, all processes together."""
    cfg = QWEN_0_5B | QUICK if a.quick else QWEN_0_5B
    h, layers, vocab, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    params = vocab * h + layers * (4 * h * h + 3 * h * inter)
    width = 2 if a.dtype == "bf16" else 4
    tokens = per_process_batch(a, procs) * a.seq_len
    # Measured at 16k, fp32, 2 x 256 tokens: 3.5 GB at the peak (1.4 GB over the weights).
    activations = tokens * (3 * vocab + layers * (8 * h + 2 * inter)) * 4
    per_proc = params * width + activations + (1 << 29)  # + torch, transformers, peft themselves
    if method == "full":
        per_proc += params * (width + 8)  # gradients, AdamW's two fp32 moments
    tables = 0 if n_keys is None or method not in MEMORY_METHODS else len(a.layers) * n_keys ** 2 * h * 4
    return procs * per_proc + tables


def per_process_batch(a, procs: int) -> int:
    """Sharded runs split the micro-batch over their processes: the same tokens per step in all."""
    return max(1, a.batch // procs)


def start(a, runs: list[tuple[str, int | None]], procs: int, share: int = 1) -> list:
    """The worker processes of one group of runs (one per rank); `share`: groups running at once."""
    from smf_ds.parallel.process_group import free_port

    settings = {k: getattr(a, k) for k in ("quick", "batch", "seq_len", "steps", "warmup", "seed", "dtype", "device",
                                           "profile", "layers")}
    settings |= {"runs": runs, "procs": procs, "port": free_port(), "batch": per_process_batch(a, procs),
                 "threads": max(1, a.threads // (procs * share)) if a.device == "cpu" else a.threads}
    return [bench_common.start_worker(__file__, ["run"], settings | {"rank": r}, memory_pass=a.device == "cpu",
                                      thp=False) for r in range(procs)]


def collect(procs: list, what: str) -> list[dict]:
    """The runs of every rank, merged: step time and split averaged over ranks, peak memory summed."""
    per_rank = [bench_common.finish_worker(p, "bench_smf_overhead", what)["runs"] for p in procs]
    merged = []
    for runs in zip(*per_rank):
        first, n = dict(runs[0]), len(runs)
        first["step_s"] = sum(r["step_s"] for r in runs) / n
        first["timed_step_s"] = sum(r["timed_step_s"] for r in runs) / n
        first["parts_s"] = {k: sum(r["parts_s"][k] for r in runs) / n for k in first["parts_s"]}
        first["counting_s"] = sum(r["counting_s"] for r in runs) / n
        first["row_grads_s"] = sum(r["row_grads_s"] for r in runs) / n
        first["peak_memory_bytes"] = sum(r["peak_memory_bytes"] for r in runs)
        first["memory_before_steps_bytes"] = sum(r["memory_before_steps_bytes"] for r in runs)
        first["tokens_per_step"] = sum(r["tokens_per_step"] for r in runs)
        first["step_s_per_rank"] = [r["step_s"] for r in runs]
        first.pop("rank")
        merged.append(first)
    return merged


def summarize(run: dict) -> dict:
    """Shares and throughput of a measured run."""
    parts, step = run["parts_s"], run["timed_step_s"]
    machinery = sum(parts[k] for k in MEMORY_PARTS) + (parts["dense_opt"] if run["method"] == "smf-memory" else 0.0)
    run["memory_machinery_s"] = machinery
    run["memory_share"] = machinery / step if run["method"] in MEMORY_METHODS else 0.0
    run["tokens_per_s"] = run["tokens_per_step"] / run["step_s"]
    return run


def plan(a) -> list[tuple[list[tuple[str, int | None]], int]]:
    """Groups of (method, n_keys) runs, each group for one set of worker processes."""
    sizes = QUICK_N_KEYS if a.quick else N_KEYS
    base_keys = sizes["256"] if a.quick else sizes["16k"]
    single = [(m, base_keys if m in MEMORY_METHODS else None) for m in a.methods]
    tables = [("smf", sizes[s]) for s in a.tables]
    if a.device == "cuda" or a.quick:  # peaks per run on a GPU; a quick run measures nothing worth a process each
        groups = [(single, 1)] if single else []
        if tables:
            groups.append((tables, a.table_procs))
        return groups
    return [([r], 1) for r in single] + [([r], a.table_procs) for r in tables]


def fmt_row(run: dict, label: str) -> str:
    p = run["parts_s"]
    ms = lambda x: f"{1e3 * x:8.0f}"  # noqa: E731
    return (f"{label:28s} {run['step_s']:7.2f} {ms(p['backbone_fwd'] + p['backbone_bwd'])} {ms(p['mem_fwd'])} "
            f"{ms(p['mem_bwd'])} {ms(p['select'])} {ms(p['update'])} {ms(p['dense_opt'])} "
            f"{100 * run['memory_share']:6.1f}% {run['tokens_per_s']:8.1f} {run['peak_memory_bytes'] / GIB:7.2f}")


def fmt_slots(n: int) -> str:
    """16k, 262k, 1M: the names --tables takes."""
    return f"{n / 2**20:g}M" if n >= 2**20 else f"{round(n / 1000)}k" if n >= 1000 else str(n)


def table_label(run: dict) -> str:
    size = fmt_slots(run["slots_per_layer"]) if run.get("slots_per_layer") else "-"
    return f"{run['method']} @{size} x{run['procs']}"


def parse_layers(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated decoder layer indices, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), help="default: fp32 on the CPU, bf16 on a GPU")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)} "
                    "(each at 16k slots in one process); empty: none")
    ap.add_argument("--tables", default=None, help="SMF at these table sizes, comma-separated from "
                    f"{','.join(N_KEYS)} (quick: {','.join(QUICK_N_KEYS)}); 'none': skip (default: all)")
    ap.add_argument("--table-procs", type=int, help="processes the --tables runs are row-sharded over "
                    "(default 2 on the CPU, 1 on a GPU: local tables)")
    ap.add_argument("--layers", default=",".join(map(str, MEMORY_LAYERS)), type=parse_layers,
                    help="decoder layers with memory, comma-separated (default: the paper's 6,12,18)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 2; quick 1)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; quick 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; quick 0)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (split over a run's processes)")
    ap.add_argument("--side-by-side", action="store_true", help="CPU: run the one-process methods two at a time "
                    "(in --methods order), one thread each, so that each pair meets the same load")
    ap.add_argument("--profile", default="", help="comma-separated methods to profile one more step of (torch.profiler, top ops)")
    ap.add_argument("--quick", action="store_true", help="Qwen's depth at hidden 64, vocab 2,048, tables of 256 and 1k slots, one step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="results JSON (default bench_results/smf_overhead[.quick|.cuda].json)")
    bench_common.add_worker_arguments(ap, ["run"])
    a = ap.parse_args(argv)
    if a.worker:
        bench_common.take_worker_settings(a)
        worker(a)
        return 0

    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.batch = a.batch or (1 if a.quick else 2)
    a.seq_len = a.seq_len or (32 if a.quick else 256)
    a.steps = a.steps if a.steps is not None else (1 if a.quick else 3)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.quick else 1)
    a.table_procs = a.table_procs or (2 if a.device == "cpu" else 1)
    a.methods = [m for m in a.methods.split(",") if m]
    if not a.layers or a.layers[0] < 0 or a.layers[-1] >= QWEN_0_5B["num_hidden_layers"]:
        ap.error(f"--layers: expected indices in 0..{QWEN_0_5B['num_hidden_layers'] - 1}, got {a.layers}")
    a.profile = [m for m in a.profile.split(",") if m]
    sizes = QUICK_N_KEYS if a.quick else N_KEYS
    a.tables = list(sizes) if a.tables is None else [] if a.tables == "none" else a.tables.split(",")
    for flag, got, allowed in (("--methods", a.methods, METHODS), ("--profile", a.profile, METHODS),
                               ("--tables", a.tables, tuple(sizes))):
        if set(got) - set(allowed):
            ap.error(f"{flag}: expected a comma-separated subset of {','.join(allowed)}, got {','.join(got)}")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.seq_len < 2 or a.table_procs < 1:
        ap.error("--steps, --batch, --table-procs: at least 1; --warmup: at least 0; --seq-len: at least 2")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device here")
        if a.table_procs > 1:
            ap.error("--table-procs: one GPU holds one process's tables here (2 ranks cannot share a GPU under NCCL)")
    out = a.out or REPO / "bench_results" / f"smf_overhead{'.quick' if a.quick else ''}{'.cuda' if a.device == 'cuda' else ''}.json"

    t_start = time.perf_counter()
    runs, skipped = [], []
    groups = plan(a)
    # Side by side: the one-process runs two at a time, one thread each, so that a pair meets the
    # same load from whatever else runs on the machine (their ratio is then the fairer one).
    pair = a.side_by_side and a.device == "cpu"
    waves = [[g] for g in groups if g[1] > 1 or not pair]
    singles = [g for g in groups if g[1] == 1 and pair]
    waves = [singles[i:i + 2] for i in range(0, len(singles), 2)] + waves
    for wave in waves:
        # A group's runs follow one another in its processes: the largest of them counts.
        need = sum(max(estimate_bytes(a, m, k, procs) for m, k in group) for group, procs in wave)
        free = mem_available()
        names = " | ".join(", ".join(f"{m}@{fmt_slots(k * k) if k else '-'}" for m, k in group) + f" x{procs}"
                           for group, procs in wave)
        if a.device == "cpu" and need > free:
            skipped.append({"runs": names, "needs_bytes": need, "available_bytes": free})
            print(f"[bench_smf_overhead] skipped {names}: needs ~{need / GIB:.1f} GiB, "
                  f"{free / GIB:.1f} GiB available", file=sys.stderr, flush=True)
            continue
        print(f"[bench_smf_overhead] {names} ({free / GIB:.1f} GiB available) ...", file=sys.stderr, flush=True)
        started = [(start(a, group, procs, share=len(wave)), names) for group, procs in wave]
        for run in (r for workers, what in started for r in collect(workers, what)):
            run["side_by_side"] = len(wave) > 1
            runs.append(summarize(run))
            print(f"[bench_smf_overhead]   {fmt_row(run, table_label(run))}", file=sys.stderr, flush=True)

    header = (f"{'method @ slots/layer x procs':28s} {'step s':>7s} {'backbone':>8s} {'mem fwd':>8s} {'mem bwd':>8s} "
              f"{'select':>8s} {'update':>8s} {'dense op':>8s} {'memory':>7s} {'tok/s':>8s} {'peak GiB':>7s}")
    print(f"\nSMF overhead at Qwen2.5-0.5B's shape ({'quick, ' if a.quick else ''}{a.device}, {a.dtype}, "
          f"{a.batch} x {a.seq_len} tokens a step, split over a run's processes; parts in ms, medians of {a.steps} steps)")
    print(header)
    for run in runs:
        print(fmt_row(run, table_label(run)))
    ratios = {}
    by = {(r["method"], r["slots_per_layer"], r["procs"]): r for r in runs}
    smf = next((r for r in runs if r["method"] == "smf" and r["procs"] == 1), None)
    if smf and ("lora", None, 1) in by:
        ratios["smf_tokens_per_s_over_lora"] = smf["tokens_per_s"] / by["lora", None, 1]["tokens_per_s"]
    if smf and ("full", None, 1) in by:
        ratios["smf_tokens_per_s_over_full"] = smf["tokens_per_s"] / by["full", None, 1]["tokens_per_s"]
    if smf and ("backbone", None, 1) in by:
        ratios["smf_step_over_backbone"] = smf["step_s"] / by["backbone", None, 1]["step_s"]
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    for s in skipped:
        print(f"  skipped {s['runs']}: needs ~{s['needs_bytes'] / GIB:.1f} GiB, "
              f"{s['available_bytes'] / GIB:.1f} GiB available")
    settings = {k: getattr(a, k) for k in ("device", "dtype", "quick", "batch", "seq_len", "steps", "warmup", "threads", "layers",
                                           "table_procs", "methods", "tables", "seed", "side_by_side")}
    result = {"settings": settings, "model": QWEN_0_5B | QUICK if a.quick else QWEN_0_5B,
              "memory": {"layers": a.layers, "heads": 4, "knn": 16, "k_dim": 256, "scoring": "kl", "top_t": 512,
                         "value_lr": 2.0},
              "parts": list(PARTS), "memory_parts": list(MEMORY_PARTS), "runs": runs, "skipped": skipped,
              "ratios": ratios, "machine": bench_common.machine(mem_available_at_end=mem_available()),
              "wall_s": time.perf_counter() - t_start}
    bench_common.write_results(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
