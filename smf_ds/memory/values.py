"""Memory value tables: one interface, a local implementation, deferred sparse row gradients.

Shape legend: N tokens, K rows read per token (heads * knn), E reads (a flat list of them), B output
bags (tokens), U unique rows read, S rows selected for an update, D value dim (a column shard's
width when sharded), R rows held by this process.

A table's weight is a non-persistent buffer, never an `nn.Parameter`: DeepSpeed would broadcast,
all-reduce, ZeRO-partition and checkpoint-on-rank-0 any parameter, and a sharded table must
escape all four.

Gradients are sparse and deferred. A lookup is an `embedding_bag` straight on the table (no copy
of the rows read), and its backward records the reads and the output gradient in the table's
`RowGradSink` instead of forming row gradients. SMF then asks the sink for the gradients of the
few rows it selected: a step costs O(reads + S x D), never O(U x D) or O(table), so no work or
allocation in it is sized by the table (its rows are still read from wherever they live: cache
for a small table, DRAM for a large one). No dense N x D gradient of the table ever exists.
A row's gradient is formed as FBGEMM's fused backward forms it, summed in place per row: the
reads sorted by row, one embedding_bag over the output gradients (one bag per row), block by
block; for SGD the sink applies each block to the table at once (`sgd_update`), so even updating
every row read (the dense rules) needs no U x D buffer. Read counts are taken at the step.
"""
from __future__ import annotations

import abc
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Elements of one block of gradient rows formed at once (2 MiB of fp32): bounds the step's scratch.
_GRAD_BLOCK = 1 << 19
_FILTER_SIZE = 1 << 16  # entries of the membership filter of reads_of (64 KiB); a power of two
_FEW_ROWS = 1 << 12  # up to this many rows asked for, row_grad filters the reads (reads_of) instead of sorting all


def coalesce_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the values of repeated row ids: (sorted unique rows, summed values)."""
    unique_U, inverse = torch.unique(rows, return_inverse=True)
    summed = values.new_zeros((unique_U.numel(),) + tuple(values.shape[1:]))
    summed.index_add_(0, inverse, values)
    return unique_U, summed


def reads_of(rows_S: torch.Tensor, rows_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions e of the reads whose row is in the sorted unique rows_S, index of that row in rows_S).

    A constant-size membership filter on the row id's low bits keeps the reads that may hit (a
    few false positives when the table has more rows than the filter), and only those are
    searched in rows_S: O(reads), about 3x faster than isin's sort and 9x faster than a binary
    search of every read, with no allocation sized by the table.
    """
    member = torch.zeros(_FILTER_SIZE, dtype=torch.bool, device=rows_E.device)
    member[rows_S & (_FILTER_SIZE - 1)] = True
    candidates = member[rows_E & (_FILTER_SIZE - 1)].nonzero().squeeze(1)
    pos = torch.searchsorted(rows_S, rows_E[candidates]).clamp_(max=max(rows_S.numel() - 1, 0))
    hit = rows_S[pos] == rows_E[candidates]
    return candidates[hit], pos[hit]


class RowGradSink:
    """A table's deferred row gradients (from every backward) and read counts (every forward).

    A gradient entry (rows_E, weights_E, bags_E, grad_BD) says: read e took row rows_E[e] with
    weight weights_E[e] into output bag bags_E[e], whose gradient is grad_BD[bags_E[e]]. rows_E
    may be N x K with bags_E None: then the bag of read (n, k) is n. A row's gradient is the sum
    of weights_E[e] * grad_BD[bags_E[e]] over its reads, over every entry since the last clear
    (so gradient accumulation over micro-batches costs nothing until the optimizer step).
    """

    def __init__(self) -> None:
        self.grad_entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.access_entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_grad(self, rows_E: torch.Tensor, weights_E: torch.Tensor, bags_E: torch.Tensor | None,
                 grad_BD: torch.Tensor) -> None:
        if rows_E.numel():
            self.grad_entries.append((rows_E, weights_E, bags_E, grad_BD))

    def add_access(self, rows_U: torch.Tensor, counts_U: torch.Tensor | None) -> None:
        """Read counts of rows; counts_U None: rows_U are single reads (repeats allowed), counted
        when the step asks (a forward need not pay for the sort)."""
        if rows_U.numel():
            self.access_entries.append((rows_U, counts_U))

    def clear(self) -> None:
        self.grad_entries.clear()
        self.access_entries.clear()

    def read_rows(self, device=None) -> torch.Tensor:
        """Sorted unique rows that any recorded backward read."""
        if not self.grad_entries:
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.unique(torch.cat([rows.reshape(-1) for rows, *_ in self.grad_entries]))

    def _sorted_reads(self, rows_S: torch.Tensor, dtype):
        """Per gradient entry, the reads of rows_S sorted by row: (index of the row in rows_S, bag,
        weight in `dtype`, grad_BD in `dtype`); and the sorted positions in rows_S read at all."""
        entries, read = [], []
        for rows_E, weights_E, bags_E, grad_BD in self.grad_entries:
            per_bag = rows_E.shape[1] if rows_E.dim() == 2 else 1
            flat = rows_E.reshape(-1)
            if rows_S.numel() <= _FEW_ROWS:  # few rows: filter the reads, then sort the hits
                hits, pos = reads_of(rows_S, flat)
                pos, order = torch.sort(pos, stable=True)  # a row's reads stay in read order
                hits = hits[order]
            else:  # many: sort every read by row, then place each distinct row read in rows_S
                by_row, hits = torch.sort(flat, stable=True)
                rows_R, per_row = torch.unique_consecutive(by_row, return_counts=True)
                del by_row  # reads-sized: the step's peak is a few of these
                pos_R = torch.searchsorted(rows_S, rows_R).clamp_(max=rows_S.numel() - 1)
                in_S = rows_S[pos_R] == rows_R
                if not bool(in_S.all()):
                    hits = hits[in_S.repeat_interleave(per_row)]
                    pos_R, per_row = pos_R[in_S], per_row[in_S]
                pos = pos_R.repeat_interleave(per_row)
                del rows_R, per_row, pos_R, in_S  # the step's peak is a few reads-sized tensors: not these too
            bags = hits // per_bag if bags_E is None else bags_E[hits]
            entries.append((pos, bags, weights_E.reshape(-1)[hits].to(dtype), grad_BD.to(dtype)))
            read.append(torch.unique_consecutive(pos))
        read_S = read[0] if len(read) == 1 else torch.unique(torch.cat(read))
        return entries, read_S

    @torch.no_grad()
    def row_grad_blocks(self, rows_S: torch.Tensor, width: int, dtype=torch.float32):
        """Yield (positions p in rows_S, grad of rows_S[p]) block by block, over the rows of the sorted
        unique `rows_S` that some backward read (the others' gradient is zero).

        A row's gradient is a weighted sum of output-gradient rows: embedding_bag over grad_BD, with
        the row's reads as one bag (reads sorted by row), forms it in place per row, so no
        reads-sized block of gradient rows is ever gathered, and a block of rows is
        _GRAD_BLOCK / width rows whatever the number of rows asked for.
        """
        if rows_S.numel() == 0 or not self.grad_entries:
            return
        rows_S = rows_S.contiguous()
        entries, read_S = self._sorted_reads(rows_S, dtype)
        block = max(1, _GRAD_BLOCK // max(1, width))
        # Where each row's reads start in each entry, and the block bounds, found once (few small ops per block).
        starts = [torch.searchsorted(pos, read_S) for pos, *_ in entries]
        bounds = [s[::block].tolist() + [pos.numel()] for s, (pos, *_) in zip(starts, entries)]
        for b, part in enumerate(read_S.split(block)):
            grad = None
            for (_, bags, weights, grad_BD), start, bound in zip(entries, starts, bounds):
                lo, hi = bound[b], bound[b + 1]
                if hi == lo:
                    continue
                offsets = start[b * block:b * block + part.numel()] - lo
                g = F.embedding_bag(bags[lo:hi], grad_BD, offsets, per_sample_weights=weights[lo:hi], mode="sum")
                grad = g if grad is None else grad.add_(g)
            yield part, grad

    def row_grad(self, rows_S: torch.Tensor, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """grad_SD of the sorted unique `rows_S` (zeros for rows no backward read)."""
        out = torch.zeros((rows_S.numel(), width), dtype=dtype, device=device if device is not None else rows_S.device)
        for part, grad in self.row_grad_blocks(rows_S, width, dtype):
            out.index_copy_(0, part, grad)
        return out

    @torch.no_grad()
    def sgd_update(self, weight: torch.Tensor, rows_S: torch.Tensor, lr: float, divisor: float = 1.0,
                   first_row: int = 0) -> torch.Tensor:
        """weight[rows_S - first_row] -= lr * grad / divisor, block by block in place (the same
        arithmetic as forming grad_SD first); returns the squared norm of grad / divisor (float64).
        Rows that no backward read are left as they are (their step is zero)."""
        sq_norm = torch.zeros((), dtype=torch.float64, device=weight.device)
        rows_S = rows_S.contiguous()
        for part, grad in self.row_grad_blocks(rows_S, weight.shape[1], weight.dtype):
            if divisor != 1:
                grad.div_(divisor)
            flat = grad.reshape(-1)
            sq_norm += torch.dot(flat, flat).double()  # no block-sized float64 copy (the step's peak is a few blocks)
            weight.index_add_(0, rows_S[part] - first_row, grad.mul_(-lr))  # w + (-(lr g)) == w - lr g exactly
        return sq_norm

    def coalesced_grad(self, width: int, dtype=torch.float32, device=None):
        """(rows read sorted, their gradient rows) over every backward since the last clear."""
        rows = self.read_rows(device)
        return rows, self.row_grad(rows, width, dtype, device)

    def coalesced_access(self, device=None):
        """(rows_U sorted, counts_U) summed over every forward since the last clear."""
        entries = self.access_entries
        if not entries:
            return torch.empty(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)
        reads = [rows for rows, counts in entries if counts is None]
        if reads:
            rows, counts = torch.unique(reads[0] if len(reads) == 1 else torch.cat(reads), return_counts=True)
            entries = [(rows, counts)] + [e for e in entries if e[1] is not None]
        if len(entries) == 1:  # its rows are already sorted and unique
            return entries[0]
        return coalesce_rows(torch.cat([r for r, _ in entries]), torch.cat([c for _, c in entries]))


def read_weight_grads(grad_BD: torch.Tensor, weight: torch.Tensor, rows_E: torch.Tensor,
                      offsets_B: torch.Tensor | None) -> torch.Tensor:
    """d loss / d weights_E of a bag lookup: for each read, output gradient of its bag . row read.

    On CPU a sampled dense-dense matmul (grad_BD @ weight.T at the reads' positions) computes it
    without gathering the E x D rows read, about 1.5x faster than embedding_bag's own backward.
    Elsewhere (not measured on GPU yet) embedding_bag's own backward does it.
    """
    flat = rows_E.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros_like(rows_E, dtype=grad_BD.dtype)
    if weight.device.type != "cpu":
        return read_weight_grads_by_autograd(grad_BD, weight, rows_E, offsets_B)
    if offsets_B is None:  # N x K: bag n reads row n
        crow = torch.arange(0, flat.numel() + 1, rows_E.shape[1], device=flat.device)
    else:
        crow = torch.cat([offsets_B, offsets_B.new_tensor([flat.numel()])])
    with warnings.catch_warnings():  # torch's "sparse CSR is beta" notice: not news for a sampling pattern
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(crow, flat, grad_BD.new_zeros(flat.numel()),
                                          size=(grad_BD.shape[0], weight.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, grad_BD.contiguous(), weight.t(), beta=0.0).values().view_as(rows_E)


def read_weight_grads_by_autograd(grad_BD: torch.Tensor, weight: torch.Tensor, rows_E: torch.Tensor,
                                  offsets_B: torch.Tensor | None) -> torch.Tensor:
    """The same through embedding_bag's own backward (d out / d weights does not depend on them)."""
    with torch.enable_grad():
        weights_E = torch.zeros(rows_E.shape, dtype=weight.dtype, device=weight.device, requires_grad=True)
        out_BD = F.embedding_bag(rows_E, weight.detach(), offsets_B, per_sample_weights=weights_E, mode="sum")
        (grad,) = torch.autograd.grad(out_BD, weights_E, grad_BD)
    return grad


class BagLookup(torch.autograd.Function):
    """out_BD = embedding_bag(rows_E, weight, offsets_B, weights_E). The backward gives weights_E
    its gradient and, when the table trains, records the reads and grad_BD in the sink (rows
    as record_rows_E: global ids); no row gradient is formed (see RowGradSink). `anchor` is an
    empty tensor requiring grad, so the output joins the autograd graph even when the read
    weights do not train (values-only scope)."""

    @staticmethod
    def forward(ctx, anchor, weights_E, weight, rows_E, offsets_B, sink, record_rows_E, bags_E):  # noqa: D102
        ctx.lookup = (weight, rows_E, offsets_B)
        ctx.record = None if sink is None else (sink, record_rows_E, weights_E.detach(), bags_E)
        return F.embedding_bag(rows_E, weight, offsets_B, per_sample_weights=weights_E, mode="sum")

    @staticmethod
    def backward(ctx, grad_BD):  # noqa: D102
        if ctx.record is not None:
            sink, rows, weights, bags = ctx.record
            sink.add_grad(rows, weights, bags, grad_BD)
        grad_weights = read_weight_grads(grad_BD, *ctx.lookup) if ctx.needs_input_grad[1] else None
        return None, grad_weights, None, None, None, None, None, None


def masked_counts(inverse_NK: torch.Tensor, token_mask_N: torch.Tensor | None, num_unique: int) -> torch.Tensor:
    """How often each unique row was read by unmasked tokens (padding does not count)."""
    if token_mask_N is not None:
        inverse_NK = inverse_NK[token_mask_N.bool()]
    return torch.bincount(inverse_NK.reshape(-1), minlength=num_unique)


def read_counts(indices_NK: torch.Tensor, token_mask_N: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique rows, how often unmasked tokens read each)."""
    rows_U, inverse_NK = torch.unique(indices_NK, return_inverse=True)
    return rows_U, masked_counts(inverse_NK, token_mask_N, rows_U.numel())


class ValueTable(nn.Module, metaclass=abc.ABCMeta):
    """Interface of every value table (local, row-sharded, column-sharded).

    num_rows / dim are the *global* table shape. Row ids are always global.
    """

    num_rows: int
    dim: int

    def __init__(self) -> None:
        super().__init__()
        self.sink = RowGradSink()
        self.requires_grad = True  # values train unless a train scope freezes them
        self.track_access = False  # record per-row read counts (SMF selection, background stats)
        # Layout across processes, set by smf_ds.parallel (None: not split that way).
        # row_group: ranks hold different rows; col_group: different slices of the value dim;
        # replica_group: ranks hold identical copies whose reads and gradients must be summed.
        self.row_group = None
        self.col_group = None
        self.replica_group = None

    def _apply(self, fn, recurse=True):
        """Move with the model, but keep the table's own dtype (fp32 by default).

        `model.to(torch.bfloat16)` would otherwise round the values too, and SGD steps with the
        large value learning rates of SMF would then mostly round away. Rows are read in the
        table's dtype; the layer casts its output to the activations' dtype.
        """
        weight = self._buffers.pop("weight")
        try:
            super()._apply(fn, recurse)
            target = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        finally:
            self._buffers["weight"] = weight
        if target.device != weight.device:
            self._buffers["weight"] = weight.to(target.device)
        return self

    def bag_lookup(self, weight: torch.Tensor, rows_E: torch.Tensor, weights_E: torch.Tensor,
                   offsets_B: torch.Tensor | None = None, record_rows_E: torch.Tensor | None = None,
                   bags_E: torch.Tensor | None = None) -> torch.Tensor:
        """out_BD = weighted sum of the rows each bag reads, straight from `weight` (this process's
        part); differentiable in the weights; the backward records the reads for the sink.

        rows_E index `weight`: N x K (bag n reads row n) or flat with `offsets_B`.
        record_rows_E: the same reads as global row ids, if they differ from rows_E.
        """
        weights_E = weights_E.to(weight.dtype)
        trains = self.requires_grad and torch.is_grad_enabled()
        if not (trains or (weights_E.requires_grad and torch.is_grad_enabled())):
            return F.embedding_bag(rows_E, weight, offsets_B, per_sample_weights=weights_E, mode="sum")
        anchor = torch.empty(0, device=weight.device, requires_grad=True) if trains else None
        sink = self.sink if trains else None
        rows = rows_E if record_rows_E is None else record_rows_E
        return BagLookup.apply(anchor, weights_E, weight, rows_E, offsets_B, sink, rows, bags_E)

    # --- what each implementation provides ----------------------------------------------------
    @abc.abstractmethod
    def lookup(self, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
               token_mask_N: torch.Tensor | None = None) -> torch.Tensor:
        """out_ND = sum_k weights[n,k] * V[indices[n,k]]; differentiable in weights, rows to sink."""
        ...

    # --- state held by this process (a shard when sharded) ------------------------------------
    @property
    def local_weight(self) -> torch.Tensor:
        return self.weight

    def owned_row_range(self) -> tuple[int, int]:
        """[start, stop) of global rows whose weights this process holds (all, unless row-sharded)."""
        return 0, self.num_rows

    def owned_col_range(self) -> tuple[int, int]:
        """[start, stop) of the value dim this process holds (all, unless column-sharded)."""
        return 0, self.dim

    @abc.abstractmethod
    def full_weight(self) -> torch.Tensor:
        """A copy of the whole num_rows x dim table (gathered when sharded: a collective); writing to
        it changes nothing (load_full_weight does)."""
        ...

    def gather_full_weight(self, dst: int = 0) -> torch.Tensor | None:
        """The whole table on the CPU of global rank `dst`, for saving; a collective for sharded
        tables, which send their parts to dst only, chunk by chunk, and return None elsewhere. A
        local table is whole on every process: each gets its own (the CPU weight itself, no copy)."""
        return self.weight.detach().cpu()

    @abc.abstractmethod
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Set this process's part from a whole num_rows x dim table."""
        ...

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, local={tuple(self.local_weight.shape)}"


class LocalValueTable(ValueTable):
    """The whole table in this process."""

    def __init__(self, num_rows: int, dim: int, init_std: float | None = None,
                 generator: torch.Generator | None = None, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        if weight is None:
            std = dim ** -0.5 if init_std is None else init_std
            weight = torch.randn(num_rows, dim, generator=generator) * std
        if tuple(weight.shape) != (num_rows, dim):
            raise ValueError(f"value table weight: expected shape {(num_rows, dim)}, got {tuple(weight.shape)}")
        self.register_buffer("weight", weight, persistent=False)

    def lookup(self, indices_NK, weights_NK, token_mask_N=None):
        if self.track_access:  # counted at the step, not here
            reads = indices_NK if token_mask_N is None else indices_NK[token_mask_N.bool()]
            self.sink.add_access(reads.reshape(-1), None)
        return self.bag_lookup(self.weight, indices_NK, weights_NK)

    def full_weight(self):
        return self.weight.detach().clone()

    def load_full_weight(self, weight):
        if tuple(weight.shape) != (self.num_rows, self.dim):
            raise ValueError(f"value table: expected a {(self.num_rows, self.dim)} table, "
                             f"got {tuple(weight.shape)}")
        self.weight.copy_(weight)
