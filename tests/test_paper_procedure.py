"""The paper code's training procedure as options (the smf-paper variant): per-micro-batch
selection with padded reads counted, summed accumulation, the leaky AdamW and its schedule, the
loss on every token; each checked against a brute-force reference of what the paper's code does."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run_distributed
from smf_ds.config import ConfigError, SparseConfig, load_config
from smf_ds.memory.inject import inject_memory, memory_layers, value_tables
from smf_ds.parallel.shard import shard_memory
from smf_ds.sparse.background import BackgroundStats
from smf_ds.sparse.optim import SparseRowOptimizer, schedule_factor
from smf_ds.train.batches import IGNORE, GlobalBatchOrder, collate, tokenize_prompt_answer
from smf_ds.train.loop import Trainer

VOCAB, PAD = 64, 0
MICRO, ACCUM, TOP_T, LR = 3, 2, 4, 0.5


def _model(memory_cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return inject_memory(model, memory_cfg)


def _examples(n=12):
    """Lengths 2 to 9: every micro-batch pads some of its sequences, some by several tokens."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (2 + (i * 5) % 8,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _background(rows: int) -> BackgroundStats:
    g = torch.Generator().manual_seed(11)
    df = torch.randint(0, 30, (rows,), generator=g)
    return BackgroundStats(30, {1: df}, {1: df * 3})


def _cfg(run_dir, extra=(), world=1, accum=ACCUM):
    return load_config(overrides=[
        "memory.layers=[1]", "memory.n_keys=8", "memory.heads=2", "memory.knn=4", "memory.k_dim=8",
        "memory.scale_init=1.0", f"memory.value_lr={LR}", "sparse.scoring=tfidf", f"sparse.top_t={TOP_T}",
        "train.scope=values", "train.steps=1", f"train.micro_batch_size={MICRO}", f"train.grad_accum={accum}",
        f"out_dir={run_dir}", *extra])


class DenseValues(nn.Module):
    """The paper code's value table: an nn.Parameter read by embedding_bag, the dense N x D gradient
    masked by a hook to the top-t rows of the reads of the forward just made (every token's, padding
    included)."""

    def __init__(self, weight: torch.Tensor, background: BackgroundStats, layer: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.idf = torch.log((background.num_batches + 1.0) / (background.df[layer].double() + 1.0))
        self.last_indices = None
        self.selections: list[set[int]] = []
        self.weight.register_hook(self._mask)

    def lookup(self, indices_NK, weights_NK, token_mask_N=None):
        self.last_indices = indices_NK.detach().clone()
        return F.embedding_bag(indices_NK, self.weight, per_sample_weights=weights_NK.to(self.weight.dtype),
                               mode="sum")

    def _mask(self, grad):
        counts = torch.bincount(self.last_indices.reshape(-1), minlength=self.weight.shape[0]).double()
        score = counts / counts.sum() * self.idf
        # Brute force: every read row ranked by (score desc, row id asc), the first TOP_T kept.
        ranked = sorted((row for row in range(len(score)) if counts[row] > 0), key=lambda r: (-float(score[r]), r))
        chosen = ranked[:TOP_T]
        self.selections.append(set(chosen))
        mask = torch.zeros(self.weight.shape[0], 1, dtype=grad.dtype)
        mask[chosen] = 1.0
        return grad * mask


def _paper_reference(model, examples, background):
    """One step of the paper's code: per micro-batch forward, backward of the unscaled loss (summed
    over micro-batches), the hook's mask; then SGD on the table. (new table, selections per micro-batch)."""
    (layer, mlp), = memory_layers(model)
    values = DenseValues(mlp.memory.values.full_weight(), background, layer)
    mlp.memory.values = values
    for p in model.parameters():
        p.requires_grad_(p is values.weight)
    order = GlobalBatchOrder(len(examples), MICRO, ACCUM, 1, 0)
    for micro in range(ACCUM):
        batch = collate([examples[i] for i in order.indices(0, 0, micro)], PAD)
        model(**batch).loss.backward()
    with torch.no_grad():
        new = values.weight - LR * values.weight.grad
    return new, values.selections


def _masked_selections(model, examples, background):
    """The same micro-batches' top-t with padded tokens left out of the counts (what the test
    must tell apart from the paper's)."""
    (layer, mlp), = memory_layers(model)
    idf = torch.log((background.num_batches + 1.0) / (background.df[layer].double() + 1.0))
    order = GlobalBatchOrder(len(examples), MICRO, ACCUM, 1, 0)
    out = []
    for micro in range(ACCUM):
        batch = collate([examples[i] for i in order.indices(0, 0, micro)], PAD)
        seen = {}
        hook = mlp.memory.register_forward_hook(lambda m, args, o: seen.update(x=args[0]))
        with torch.no_grad():
            model(**batch)
        hook.remove()
        x = seen["x"]
        indices, _ = mlp.memory.select(x.reshape(-1, x.shape[-1]))
        kept = indices.reshape(x.shape[0] * x.shape[1], -1)[batch["attention_mask"].reshape(-1).bool()]
        counts = torch.bincount(kept.reshape(-1), minlength=idf.numel()).double()
        score = counts / counts.sum() * idf
        ranked = sorted((r for r in range(len(score)) if counts[r] > 0), key=lambda r: (-float(score[r]), r))
        out.append(set(ranked[:TOP_T]))
    return out


def test_smf_paper_selection_updates_the_rows_the_paper_code_would(tmp_path):
    """A 2-micro-batch step with padding: per micro-batch top-t, padded reads counted, the masked
    gradients summed: the same rows change, by the same amounts, as in a brute-force reference."""
    cfg = _cfg(tmp_path / "run", ["sparse.select_every=micro_batch", "sparse.count_padding=true",
                                  "train.accum_reduction=sum"])
    examples = _examples()
    model = _model(cfg.memory)
    reference_model = copy.deepcopy(model)
    before = value_tables(model)[0][1].full_weight()
    background = _background(before.shape[0])
    expected, selections = _paper_reference(reference_model, examples, background)

    trainer = Trainer(cfg, model, examples, PAD, background=background)
    trainer.fit()
    after = value_tables(trainer.model)[0][1].full_weight()
    trainer.close()

    union = set().union(*selections)
    changed = set((after != before).any(dim=1).nonzero().squeeze(1).tolist())
    assert len(selections) == ACCUM and all(len(s) == TOP_T for s in selections)
    assert len(union) > TOP_T  # per micro-batch selection: more than t rows change in one step
    assert changed == union
    assert set(trainer.updater.previous[1].tolist()) == union
    assert torch.allclose(after, expected, atol=1e-5, rtol=0), (after - expected).abs().max()
    # The reference tells the options apart: counting padding picks other rows than masking it.
    assert _masked_selections(copy.deepcopy(model), examples, background) != selections


def test_smf_paper_per_micro_batch_with_padding_masked_differs_from_the_paper(tmp_path):
    """The ablation's 'padding masked' run selects other rows: the option is not a no-op here."""
    examples = _examples()
    runs = {}
    for name, extra in {"paper": ["sparse.count_padding=true"], "masked": []}.items():
        cfg = _cfg(tmp_path / name, ["sparse.select_every=micro_batch", *extra])
        model = _model(cfg.memory)
        trainer = Trainer(cfg, model, examples, PAD, background=_background(64))
        trainer.fit()
        runs[name] = set(trainer.updater.previous[1].tolist())
        trainer.close()
    assert runs["paper"] != runs["masked"]


def test_summed_accumulation_doubles_the_step_of_two_micro_batches(tmp_path):
    """train.accum_reduction=sum: the value update of a 2-micro-batch step is twice the mean's."""
    examples = _examples()
    moves = {}
    for reduction in ("mean", "sum"):
        cfg = _cfg(tmp_path / reduction, ["sparse.scoring=tf", f"train.accum_reduction={reduction}"])
        model = _model(cfg.memory)
        before = value_tables(model)[0][1].full_weight()
        trainer = Trainer(cfg, model, examples, PAD)
        trainer.fit()
        moves[reduction] = value_tables(trainer.model)[0][1].full_weight() - before
        trainer.close()
    assert moves["mean"].abs().max() > 0
    assert torch.allclose(moves["sum"], 2 * moves["mean"], atol=1e-6)


def test_dense_adamw_is_torch_adamw_on_the_masked_gradient_with_hf_cosine_warmup():
    """adamw-dense and the cosine schedule: torch.optim.AdamW over the whole table fed a gradient
    masked to the selected rows, lr from transformers' get_cosine_schedule_with_warmup; rows never
    selected after their first step keep moving (the leak the paper's code has)."""
    from transformers import get_cosine_schedule_with_warmup

    from smf_ds.memory.values import LocalValueTable

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 4, generator=g)
    table = LocalValueTable(10, 4, weight=weight.clone())
    cfg = SparseConfig(optimizer="adamw-dense", weight_decay=0.01)
    ours = SparseRowOptimizer([(0, table)], cfg, lr=0.1)
    param = nn.Parameter(weight.clone())
    ref = torch.optim.AdamW([param], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(ref, num_warmup_steps=3, num_training_steps=8)
    for step in range(8):
        rows = torch.tensor([0, 3]) if step == 0 else torch.tensor([5, 7])
        grad = torch.randn(2, 4, generator=g)
        ours.lr = 0.1 * schedule_factor("cosine", 3, 8, step)
        assert math.isclose(ours.lr, ref.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15)
        ours.update(0, rows, grad)
        dense = torch.zeros_like(param)
        dense[rows] = grad
        param.grad = dense
        ref.step()
        sched.step()
        assert torch.allclose(table.weight, param.detach(), atol=1e-6), step
    assert not torch.equal(table.weight[0], weight[0] - 0)  # row 0: selected once, it kept moving after


def test_lazy_adamw_leaves_unselected_rows_alone_where_dense_adamw_moves_them():
    from smf_ds.memory.values import LocalValueTable

    moved = {}
    for optimizer in ("adamw", "adamw-dense"):
        table = LocalValueTable(6, 3, weight=torch.ones(6, 3))
        opt = SparseRowOptimizer([(0, table)], SparseConfig(optimizer=optimizer), lr=0.1)
        opt.update(0, torch.tensor([1]), torch.ones(1, 3))
        after_first = table.weight.clone()
        opt.update(0, torch.tensor([2]), torch.ones(1, 3))
        moved[optimizer] = not torch.equal(table.weight[1], after_first[1])
    assert moved == {"adamw": False, "adamw-dense": True}


def test_schedule_factor_matches_hugging_face_constant_with_warmup():
    from transformers import get_constant_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=4)
    for step in range(7):
        assert math.isclose(schedule_factor("constant", 4, 7, step), opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def _scheduled_run(rank, world, run_dir, zero_stage):
    examples = _examples()
    cfg = _cfg(run_dir, [f"train.zero_stage={zero_stage}", "train.scope=memory+scale", "train.lr_schedule=cosine", "train.warmup_steps=2",
                                  "sparse.scoring=tf", "train.steps=2"])
    model = _model(cfg.memory)
    before = value_tables(model)[0][1].full_weight()
    dense_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".memory." in n}
    trainer = Trainer(cfg, model, examples, PAD)
    trainer.fit(steps=1)
    assert torch.equal(value_tables(trainer.model)[0][1].full_weight(), before)
    assert all(torch.equal(p, dense_before[n]) for n, p in trainer.model.named_parameters() if n in dense_before)
    trainer.fit(steps=2)  # lr 1/2 of its peak
    assert not torch.equal(value_tables(trainer.model)[0][1].full_weight(), before)
    assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 0.5)
    trainer.close()
    return True


@pytest.mark.dist
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_the_schedule_reaches_the_dense_lr_and_the_value_lr(tmp_path, zero_stage):
    """train.lr_schedule drives both learning rates: step 0 of a warm-up moves nothing (lr 0), also
    through ZeRO's optimizer wrapper."""
    assert run_distributed(_scheduled_run, 1, str(tmp_path / "run"), zero_stage) == [True]


def test_loss_on_all_labels_every_token_of_prompt_and_answer():
    from smf_ds.data.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(["what is the answer to the question", "the answer"], vocab_size=80)
    answer_only = tokenize_prompt_answer(tokenizer, "what is the question", " the answer", 64)
    everything = tokenize_prompt_answer(tokenizer, "what is the question", " the answer", 64, loss_on="all")
    assert answer_only["input_ids"] == everything["input_ids"]
    assert everything["labels"] == everything["input_ids"]
    assert IGNORE in answer_only["labels"]


def test_micro_batch_selection_refuses_split_tables_by_name():
    from smf_ds.config import SparseConfig
    from smf_ds.memory.values import LocalValueTable
    from smf_ds.sparse.step import SparseMemoryUpdater

    table = LocalValueTable(8, 2)
    table.row_group = object()  # split over ranks
    with pytest.raises(ConfigError, match=r"sparse\.select_every='micro_batch'.*memory\.sharding='replicated'"):
        SparseMemoryUpdater([(0, table)], SparseConfig(scoring="tf", select_every="micro_batch"), 1.0)


def _micro_selection_run(rank, world, run_dir):
    """W=2 x 1 micro-batch or W=1 x 2: the same examples in the same selection units (a rank's
    micro-batch), padding counted; returns the table and the rows of the last step."""
    cfg = _cfg(run_dir, ["sparse.select_every=micro_batch", "sparse.count_padding=true",
                         "sparse.optimizer=adamw-dense", "memory.value_lr=0.05", "train.lr_schedule=cosine",
                         "train.warmup_steps=1", "train.steps=3"], world=world, accum=ACCUM // world)
    model = _model(cfg.memory)
    if world > 1:
        model = shard_memory(model, None, "replicated")
    trainer = Trainer(cfg, model, _examples(), PAD, background=_background(64))
    trainer.fit()
    (_, table), = value_tables(trainer.model)
    out = {"table": table.full_weight(), "selected": trainer.updater.previous[1].tolist()}
    trainer.close()
    return out


@pytest.mark.dist
def test_per_micro_batch_selection_on_two_ranks_equals_its_single_process_twin(tmp_path):
    """DDP semantics: each rank selects from its own micro-batch, the masked gradients are averaged
    over ranks; W=2 x 1 micro-batch equals W=1 x 2 micro-batches (mean accumulation)."""
    ref = run_distributed(_micro_selection_run, 1, str(tmp_path / "w1"))[0]
    r0, r1 = run_distributed(_micro_selection_run, 2, str(tmp_path / "w2"))
    assert torch.equal(r0["table"], r1["table"])
    assert (r0["table"] - ref["table"]).abs().max() <= 1e-6
    assert r0["selected"] == ref["selected"]
    assert len(ref["selected"]) > TOP_T


def test_background_per_document_counts_each_document_that_read_a_row(tmp_path):
    """data.background_unit=document: df(i) = the background documents whose tokens read row i
    (each document read alone), B = the number of documents; brute force over the documents."""
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer
    from smf_ds.train.background import compute_background
    from smf_ds.train.inputs import text_examples

    texts = [f"reply {i}: " + " ".join(["the memory reads rows", "of a table", "per token"][: 1 + i % 3]) * (1 + i % 4)
             for i in range(9)]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=300)
    cfg = _cfg(tmp_path / "run", ["data.background_unit=document", "data.background_batches=2",
                                  "train.max_length=32"])
    model = inject_memory(build_tiny_model(tokenizer, hidden=32, layers=2), cfg.memory)
    stats = compute_background(cfg, model, tokenizer, tmp_path / "bg.safetensors", progress=False, texts=texts)

    (layer, mlp), = memory_layers(model)
    seen = {}
    hook = mlp.memory.register_forward_hook(lambda m, args, o: seen.update(x=args[0]))
    examples = text_examples(texts, tokenizer, cfg.train.max_length)
    order = GlobalBatchOrder(len(examples), 1, 1, 1, cfg.data.seed)
    df = torch.zeros(cfg.memory.slots, dtype=torch.long)
    n_docs = 2 * MICRO * ACCUM  # background_batches x the global batch's documents
    with torch.no_grad():
        for d in range(n_docs):
            (i,) = order.indices(d, 0, 0)
            model(input_ids=torch.tensor([examples[i]["input_ids"]]))
            x = seen["x"]
            rows = mlp.memory.select(x.reshape(-1, x.shape[-1]))[0].unique()
            df[rows] += 1
    hook.remove()
    assert stats.num_batches == n_docs
    assert torch.equal(stats.df[layer], df)
    assert int(df.max()) > 1 and int(df.max()) <= n_docs
    # per batch, df would count a row once per batch of MICRO x ACCUM documents: not the same
    batch_cfg = _cfg(tmp_path / "run2", ["data.background_batches=2", "train.max_length=32"])
    by_batch = compute_background(batch_cfg, model, tokenizer, tmp_path / "bg2.safetensors", progress=False,
                                  texts=texts)
    assert by_batch.num_batches == 2 and int(by_batch.df[layer].max()) <= 2


PAPER_LIKE = ["sparse.select_every=micro_batch", "sparse.count_padding=true", "sparse.optimizer=adamw-dense",
              "memory.value_lr=0.05", "train.lr=0.01", "train.lr_schedule=cosine", "train.warmup_steps=1",
              "sparse.max_grad_norm=1.0", "train.accum_reduction=sum", "train.scope=memory+scale"]


def _paper_like_run(rank, world, run_dir, steps, resume):
    cfg = _cfg(run_dir, [*PAPER_LIKE, "train.steps=4"])
    trainer = Trainer(cfg, _model(cfg.memory), _examples(), PAD, background=_background(64))
    if resume:
        assert trainer.resume()
    trainer.fit(steps=steps)
    (_, table), = value_tables(trainer.model)
    out = {"table": table.full_weight(), "dense": {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                                                   if p.requires_grad}}
    trainer.close()
    return out


@pytest.mark.dist
def test_the_paper_procedure_resumes_exactly(tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more: the leaky AdamW's state, the schedule (from
    the step count) and the dense memory parameters come back as they were."""
    straight = run_distributed(_paper_like_run, 1, str(tmp_path / "a"), 4, False)[0]
    run_distributed(_paper_like_run, 1, str(tmp_path / "b"), 2, False)
    resumed = run_distributed(_paper_like_run, 1, str(tmp_path / "b"), 4, True)[0]
    assert torch.equal(straight["table"], resumed["table"])
    assert straight["dense"].keys() == resumed["dense"].keys() and len(straight["dense"]) > 1
    assert all(torch.equal(straight["dense"][n], resumed["dense"][n]) for n in straight["dense"])
