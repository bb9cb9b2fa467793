"""Curvature as linear operators over a block selection (one base class, curvlinops-style).

Every operator maps a flat vector v ∈ ℝⁿ (the selected blocks, in order) to A v and exposes
``to_scipy()`` so any algorithm (Lanczos, CG) composes with any curvature. Normalisations:

* ``FinetuneLoss``: L_FT(θ) = Σ_n Σ_t ℓ_{n,t} / Σ_n T_n, the token-mean NLL over the whole data set
  (the expectation of the training loss); g = ∇L_FT.
* ``HessianOperator``: H_FT v, exact, by double backward (Pearlmutter), batch by batch.
* ``GGNOperator``: Jᵀ H_out J v with H_out = diag(p) − p pᵀ per response token (the generalised
  Gauss-Newton of the same token-mean loss), by forward-mode jvp then vjp.
* ``FisherOperator``: F v = (1/N) Gᵀ G v with G the per-sequence gradients of −log π(y|x)
  (matrix-free: one jvp and one vjp pass per product, G never stored).

Device and precision: products accept a vector of any dtype on any device, and return it on the
parameters' device in ``acc_dtype`` (float32 for half-precision and float32 models, float64 for
float64 ones): every sum over batches, and every dot product, is accumulated in at least float32, so a
bfloat16 model differs from a float32 one only by the rounding inside each batch's forward/backward.

Distributed (torchrun): each rank takes its round-robin share of the batches
(:func:`aligncollapse.distributed.shard`) and the accumulated products are summed over ranks, so every
rank returns the same vector; normalisations (token counts, N) are always over the whole data set.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vjp

from aligncollapse.data.encoding import IGNORE_INDEX, EncodedSet
from aligncollapse.distributed import ShardLayout, all_reduce_sum, layout_of, shard
from aligncollapse.geometry.memory import release_freed_host_memory
from aligncollapse.losses import nll_from_logits, upcast


class CurvatureOperator:
    """Base: a symmetric n×n operator on the flattened selected parameters."""

    def __init__(
        self,
        model,
        params: OrderedDict[str, torch.nn.Parameter],
        data: EncodedSet,
        batch_size: int = 32,
        sharded: bool = True,
    ):
        """``sharded=False``: this rank computes the whole product alone (for work that is already
        split over the ranks one level up, e.g. one example per rank); it never communicates."""
        self.model = model
        self.sharded = sharded
        self.params = params
        self.names = list(params)
        self.data = data
        self.batch_size = batch_size
        self.n = sum(p.numel() for p in params.values())
        # A model sharded with FSDP2: vectors are this rank's parts of the parameters (``layout.local``),
        # every rank runs every batch (an FSDP forward is a collective) and inner products are summed
        # over the ranks; products go by differences of backward() gradients and logits (module docstring).
        self.layout = layout_of(params)
        self.shapes = self.layout.local if self.layout is not None else params
        first = next(iter(params.values()))
        self.dtype = first.dtype
        self.device = first.device
        # Accumulation dtype: never below float32 (bf16/fp16 sums lose digits after a few hundred terms).
        self.acc_dtype = torch.promote_types(self.dtype, torch.float32)
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def zeros(self) -> torch.Tensor:
        """A zero n-vector for accumulation (``acc_dtype``, on the parameters' device)."""
        numel = self.n if self.layout is None else self.layout.numel
        return torch.zeros(numel, dtype=self.acc_dtype, device=self.device)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """⟨a, b⟩ of two of this operator's vectors (float64; summed over the ranks' parts when sharded)."""
        return dot64(a, b, layout=self.layout)

    def norm(self, a: torch.Tensor) -> float:
        return norm64(a, layout=self.layout)

    def _unflat(self, v: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Split a flat vector (any dtype, any device) into per-block tensors in each block's dtype and device."""
        want = self.n if self.layout is None else self.layout.numel
        if v.numel() != want:
            what = "this rank's parts of the sharded selection" if self.layout is not None else "the selection"
            raise ValueError(f"a vector of {v.numel()} numbers for {what}, which has {want}")
        v = v.to(self.device)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        off = 0
        for n, p in self.shapes.items():
            out[n] = v[off : off + p.numel()].reshape(p.shape).to(p.dtype)
            off += p.numel()
        return out

    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat(
            [(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, self.shapes.values())]
        )

    def _batches(self, sharded: bool = True):
        """The data's batches on the model's device: this rank's round-robin share of them when
        running distributed (``sharded`` and the operator's ``sharded``), all of them otherwise."""
        # A pass starts, and leaves, with the heap it and earlier passes freed handed back: kept, it
        # would sit beside the next stage's n-vectors (release_freed_host_memory).
        release_freed_host_memory()
        dev = next(self.model.parameters()).device
        starts = list(range(0, len(self.data), self.batch_size))
        split = sharded and self.sharded and self.layout is None  # a sharded model: every rank runs every batch
        for s in shard(starts) if split else starts:
            b = self.data.batch(range(s, min(s + self.batch_size, len(self.data))))
            yield {k: v.to(dev) for k, v in b.items()}
        release_freed_host_memory()

    # Logit-sized work ([rows, T, V] tensors, several alive at once) is split into row chunks of at
    # most this many bytes per tensor: one row at a time for a 128K vocabulary, whole batches for small ones.
    logits_chunk_bytes = 64 * 2**20

    def _row_chunks(self, b: dict, itemsize: int = 8):
        """``b`` split along its rows so that one [rows, T, V] tensor of ``itemsize`` bytes stays
        within ``logits_chunk_bytes``; yields ``b`` itself when it already does."""
        rows, T = b["input_ids"].shape
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        V = head.weight.shape[0] if head is not None else 1
        per_row = max(1, T * V * itemsize)
        step = max(1, self.logits_chunk_bytes // per_row)
        if step >= rows:
            yield b
            return
        for s in range(0, rows, step):
            yield {k: v[s : s + step] for k, v in b.items()}

    def _accumulate(self, out: torch.Tensor, blocks, alpha: float = 1.0) -> None:
        """out += alpha · the flat concatenation of per-parameter ``blocks`` (None: zero), block by
        block, so no flat n-vector copy is made beside ``out``."""
        off = 0
        for p, t in zip(self.shapes.values(), blocks):
            if t is not None:
                out[off : off + p.numel()].add_(t.detach().reshape(-1).to(out.dtype), alpha=alpha)
            off += p.numel()

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum this rank's partial result over the ranks (in place); unsharded operators keep theirs, and
        so does a sharded model's (each rank ran every batch for its own part of the vector)."""
        return all_reduce_sum(t) if self.sharded and self.layout is None else t

    def _grads(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """∂loss/∂θ per selected parameter: by autograd.grad, or on a sharded model by backward() (FSDP2
        gathers its parameters into tensors outside autograd's view of them; its reduce-scatter
        averages the ranks' identical gradients), this rank's parts."""
        if self.layout is None:
            return list(torch.autograd.grad(loss, list(self.params.values()), allow_unused=True))
        plist = list(self.params.values())
        req = [p.requires_grad for p in plist]
        for p in plist:
            p.requires_grad_(True)
            p.grad = None
        try:
            loss.backward()
            grads = [None if p.grad is None else p.grad.to_local() for p in plist]
        finally:
            self.model.zero_grad(set_to_none=True)  # unselected parameters' gradients too
            for p, r in zip(plist, req):
                p.requires_grad_(r)
        return grads

    def _batch_loss(self, b) -> torch.Tensor:
        """Summed response-token NLL of one batch (with graph)."""
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return nll_from_logits(logits, b["labels"]).sum()

    def _total_tokens(self) -> int:
        return sum(sum(1 for t in it.labels[1:] if t != IGNORE_INDEX) for it in self.data.items)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def dense(self) -> torch.Tensor:
        """The full matrix by n products (tests and tiny models only)."""
        self._whole_only("dense()")
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.n)], dim=1)

    def _whole_only(self, what: str) -> None:
        if self.layout is not None:
            raise NotImplementedError(f"{what} of an operator on a sharded model: its vectors are each rank's parts")

    def to_scipy(self):
        from scipy.sparse.linalg import LinearOperator

        self._whole_only("to_scipy()")

        def mv(x: np.ndarray) -> np.ndarray:  # the only host <-> device crossing of the operators
            v = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))
            out = self.matvec(v.to(device=self.device, dtype=self.dtype))
            return out.detach().to(device="cpu", dtype=torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, dtype=np.float64)


class FinetuneLoss(CurvatureOperator):
    """Not an operator: the fine-tuning loss and its gradient g (shares the batching code)."""

    def value_and_grad(
        self, into: torch.Tensor | None = None, alpha: float = 1.0, reduce: bool = True
    ) -> tuple[float, torch.Tensor]:
        """(L, g); with ``into``, g·alpha is added to that n-vector (returned) instead of a new one;
        ``reduce=False`` leaves this rank's partial sums unreduced (the caller reduces once)."""
        total = self._total_tokens()
        g = self.zeros() if into is None else into
        val = torch.zeros((), dtype=torch.float64, device=self.device)
        was = self.model.training
        self.model.eval()
        for b in self._batches():
            loss = self._batch_loss(b) / total
            grads = self._grads(loss)
            self._accumulate(g, grads, alpha)  # block by block: no flat copy of the gradient
            val += loss.detach().to(torch.float64)
            # Freed before the next batch's backward, which would otherwise run beside this batch's
            # gradients: one n-vector more at the peak (1.43 GiB, measured on a 384M model).
            del grads, loss
        self.model.train(was)
        if not reduce:
            return float(val), g
        self._reduce(g)
        return float(self._reduce(val)), g


def ft_gradient(model, params, data: EncodedSet, batch_size: int = 32) -> torch.Tensor:
    """g = ∇L_FT at the model's current weights (flat, over ``params``)."""
    return FinetuneLoss(model, params, data, batch_size).value_and_grad()[1]


def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 2**22, layout: ShardLayout | None = None) -> float:
    """⟨a, b⟩ accumulated in float64, converting ``chunk`` elements at a time: no float64 copy of an
    n-vector (3 GB at n = 384M) is ever made. With a ``layout`` (a sharded model's vectors are each
    rank's parts) the local products are summed over the ranks."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"dot64: vectors of {a.numel()} and {b.numel()} elements")
    local = sum(torch.dot(a[i : i + chunk].double(), b[i : i + chunk].double()) for i in range(0, a.numel(), chunk))
    if layout is None:
        return float(local)
    return float(layout.sum(torch.tensor([float(local)], dtype=torch.float64, device=a.device)))


def norm64(a: torch.Tensor, chunk: int = 2**22, layout: ShardLayout | None = None) -> float:
    """‖a‖ accumulated in float64, ``chunk`` elements at a time (see :func:`dot64`)."""
    return math.sqrt(max(dot64(a, a, chunk, layout), 0.0))


@contextlib.contextmanager
def displaced(params: list[torch.Tensor], steps: list[torch.Tensor]):
    """Yields ``move(alpha)``, which sets every weight to its value on entry + alpha · its step
    (always from a backup, so any sequence of moves is exact); restores the entry values bit for
    bit on exit. Memory: one copy of the weights."""
    backup = [p.detach().clone() for p in params]

    def move(alpha: float) -> None:
        with torch.no_grad():
            for p, b, st in zip(params, backup, steps):
                p.copy_(b)
                if alpha:
                    p.add_(st.to(p.dtype), alpha=alpha)

    try:
        yield move
    finally:
        move(0.0)


class HessianOperator(CurvatureOperator):
    """H_FT v by double backward, accumulated over batches (exact)."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvecs_many([v])[0]

    def matvecs_many(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """[H v for v in vectors] from one forward and first backward per batch (the double backward
        once per vector): k vectors cost one shared pass plus k second-order ones. Memory: k outputs.
        A sharded model has no double backward (its parameters are outside autograd's graph): there
        each product is :meth:`matvec_by_differences`."""
        if self.layout is not None:
            return [self.matvec_by_differences(v) for v in vectors]
        self.matvecs += len(vectors)
        total = self._total_tokens()
        vss = [self._unflat(v) for v in vectors]
        outs = [self.zeros() for _ in vectors]
        plist = list(self.params.values())
        acc = self.acc_dtype
        was = self.model.training
        self.model.eval()
        for batch in self._batches():
            for b in self._row_chunks(batch, itemsize=4):
                loss = self._batch_loss(b) / total
                grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
                for k, (vs, out) in enumerate(zip(vss, outs)):
                    dot = sum(torch.dot(g.reshape(-1).to(acc), vs[n].reshape(-1).to(acc))
                              for g, n in zip(grads, self.names) if g is not None)  # fmt: skip
                    hv = torch.autograd.grad(dot, plist, allow_unused=True, retain_graph=k < len(vss) - 1)
                    del dot
                    self._accumulate(out, hv)
                    del hv
                del grads
        self.model.train(was)
        return [self._reduce(out) for out in outs]

    def matvec_by_differences(self, v: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε from two gradient passes: about two gradients' cost
        against the double backward's three. Error O(‖εv‖²) (truncation) + O(u/‖εv‖) (rounding, u
        at least float32's, and the rounding of θ ± εv itself, ∝ u‖θ‖): with ‖εv‖ = u^{1/3}/5,
        measured 7e-5 and 3e-4 relative on a float32 4.3M Llama (‖θ‖ = 65) — for quantities that
        need no more (norms, the shuffled null). With ``at`` = ∇L(θ) already computed (by the same
        :class:`FinetuneLoss`, so that its rounding cancels), the one-sided (∇L(θ + εv) − ∇L(θ))/ε
        from one gradient pass: error O(‖εv‖) + O(u/‖εv‖), ‖εv‖ = u^{1/2}. Half-precision weights
        get the exact product (a sharded model: an error). Memory: the weights' backup, the output
        (both gradients accumulate into it) and a batch's gradients: 3 n-vectors. The weights are
        restored exactly."""
        plist = list(self.shapes.values())  # on a sharded model, this rank's parts: moved in place
        dtype = plist[0].dtype
        if dtype in (torch.float16, torch.bfloat16):  # a step would round away: the exact product
            if self.layout is not None:
                raise half_precision_sharded_error()
            return self.matvec(v)
        u = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
        vn = self.norm(v)
        if vn == 0.0:
            return self.zeros()
        self.matvecs += 1
        grad_op = FinetuneLoss(self.model, self.params, self.data, self.batch_size, sharded=self.sharded)
        if at is not None:
            eps = u**0.5 / vn
            with displaced(plist, list(self._unflat(v).values())) as move:
                move(eps)
                out = self._reduce(grad_op.value_and_grad(reduce=False)[1])
            return out.sub_(at.to(out.dtype)).div_(eps)
        eps = 0.2 * u ** (1 / 3) / vn
        out = None
        with displaced(plist, list(self._unflat(v).values())) as move:
            for sign in (1.0, -1.0):
                move(sign * eps)
                # ∇L(θ + εv), then ∇L(θ − εv) subtracted in place: one n-vector for both.
                out = grad_op.value_and_grad(into=out, alpha=sign, reduce=False)[1]
        return self._reduce(out).div_(2 * eps)  # one all-reduce of both sides' partial sums


def half_precision_sharded_error() -> Exception:
    from aligncollapse.errors import UserError

    return UserError(
        "--fsdp: curvature products of a sharded model go by finite differences, which need float32 or float64 "
        "weights (--dtype float32); half-precision weights cannot take the step"
    )


class _FunctionalMixin:
    def _logits_fn(self, b):
        names = self.names

        def f(*tensors):
            out = functional_call(
                self.model,
                dict(zip(names, tensors)),
                args=(),
                kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
            )
            return upcast(out.logits)

        return f

    def _primals(self):
        return tuple(p.detach() for p in self.params.values())


class GGNOperator(_FunctionalMixin, CurvatureOperator):
    """Generalised Gauss-Newton Jᵀ H_out J v (H_out of softmax cross-entropy) over response tokens.

    ``per="token"``: of the token-mean NLL (divided by the number of response tokens);
    ``per="sequence"``: divided by the number of sequences N. With the reference model's own
    responses as data, ``per="sequence"`` is exactly the Hessian at θ* of the alignment KL
    E_x Σ_t KL(π_θ*(·|x, y<t) ‖ π_θ(·|x, y<t)) -- the model-sampled Fisher of that Δu.
    """

    def __init__(self, model, params, data, batch_size: int = 32, per: str = "token"):
        super().__init__(model, params, data, batch_size)
        self.per = per

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvecs_many([v])[0]

    def matvecs_many(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """[G v for v in vectors]: one jvp per vector and one shared vjp (forward once, pulled back
        once per vector) per batch. Memory: k outputs. A sharded model (no jvp through its
        parameters): :meth:`matvecs_by_differences`."""
        if self.layout is not None:
            return self.matvecs_by_differences(vectors)
        return self._matvecs_functional(vectors)

    def matvecs_by_differences(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """[G v for v in vectors] without forward-mode derivatives through the parameters (for FSDP2
        shards, which torch.func cannot differentiate): per batch and vector,
        J v ≈ (z(θ + εv) − z(θ − εv))/2ε from two forwards of the logits z, ε‖v‖ = u^{1/3}/5 (u at
        least float32's roundoff: error O(‖εv‖²) + O(u/‖εv‖), about 1e-4 relative; measured 2e-8 to
        1e-7 on a float64 micro model, 5e-5 to 1e-4 for gᵀFg on float32 Llamas of 26M and 135M), then
        Jᵀ(H_out J v) by one backward of ⟨z, H_out J v⟩ at θ. Cost per vector: three forwards and
        one backward (the functional path: one jvp and a shared vjp). Memory: the weights' backup,
        k outputs, a batch's logits three times. Half-precision weights cannot take the step: an error."""
        plist = list(self.shapes.values())
        dtype = plist[0].dtype
        if dtype in (torch.float16, torch.bfloat16):
            raise half_precision_sharded_error()
        self.matvecs += len(vectors)
        total = self._total_tokens() if self.per == "token" else len(self.data)
        u = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
        norms = [self.norm(v) for v in vectors]
        steps = [list(self._unflat(v).values()) for v in vectors]
        outs = [self.zeros() for _ in vectors]
        was = self.model.training
        self.model.eval()

        def logits(b):
            return upcast(self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)

        try:
            for batch in self._batches():
                for b in self._row_chunks(batch, itemsize=4):
                    mask = (b["labels"][:, 1:] != IGNORE_INDEX).to(torch.float32)
                    for vn, st, out in zip(norms, steps, outs):
                        if vn == 0.0:
                            continue
                        eps = 0.2 * u ** (1 / 3) / vn
                        with displaced(plist, st) as move, torch.no_grad():
                            move(eps)
                            jv = logits(b)
                            move(-eps)
                            jv = jv.sub_(logits(b)).div_(2 * eps)
                        with torch.enable_grad():
                            z = logits(b)
                            p = F.softmax(z[:, :-1].detach(), -1)
                            cot = _output_hessian_times(p, jv, mask.to(p.dtype), total).to(z.dtype)
                            del p, jv
                            self._accumulate(out, self._grads((z * cot).sum()))
                            del z, cot
        finally:
            self.model.train(was)
        return [self._reduce(out) for out in outs]

    @torch.no_grad()  # torch.func transforms ignore it; unselected weights stay out of any graph
    def _matvecs_functional(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.matvecs += len(vectors)
        total = self._total_tokens() if self.per == "token" else len(self.data)
        vss = [tuple(self._unflat(v).values()) for v in vectors]
        outs = [self.zeros() for _ in vectors]
        was = self.model.training
        self.model.eval()
        for batch in self._batches():
            for b in self._row_chunks(batch, itemsize=4):
                f = self._logits_fn(b)
                _, pull = vjp(f, *self._primals())
                for vs, out in zip(vss, outs):
                    logits, jv = jvp(f, self._primals(), vs)
                    logits, jv = logits.detach(), jv.detach()
                    mask = (b["labels"][:, 1:] != IGNORE_INDEX).to(logits.dtype)
                    p = F.softmax(logits[:, :-1], -1)
                    self._accumulate(out, pull(_output_hessian_times(p, jv, mask, total).to(logits.dtype)))
                    del p, jv, logits, mask  # not alive into the next vector's jvp or the next chunk's forward
                del pull
        self.model.train(was)
        return [self._reduce(out) for out in outs]

    @torch.no_grad()
    def products_and_forms(self, g: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(G g, G h, :meth:`expansion_forms`) from one pass: per batch one forward-over-forward jvp
        along g (logits, J g, ∇²z[g, g]), one jvp along h and one shared vjp pulled back twice --
        the jvps that :meth:`matvecs_many` and :meth:`expansion_forms` would each compute, once.
        Raises as :meth:`expansion_forms` does when a layer has no forward-over-forward derivative."""
        if self.layout is not None:
            raise NotImplementedError(
                "a model sharded with FSDP2 has no forward-mode derivative through its parameters"
            )
        self.matvecs += 2
        total = self._total_tokens() if self.per == "token" else len(self.data)
        gs, hs = tuple(self._unflat(g).values()), tuple(self._unflat(h).values())
        outs = [self.zeros(), self.zeros()]
        acc = {"gFg": 0.0, "gAq": 0.0, "qAq": 0.0, "hFh": 0.0, "dAd": 0.0}
        was = self.model.training
        self.model.eval()
        try:
            for batch in self._batches():
                for b in self._row_chunks(batch):
                    f = self._logits_fn(b)
                    with composite_activations():
                        (z, jg), (_, d2) = jvp(lambda *ps, f=f: jvp(f, ps, gs), self._primals(), gs)
                        _, jh = jvp(f, self._primals(), hs)
                    z, jg, jh, d2 = z.detach(), jg.detach(), jh.detach(), d2.detach()
                    mask = (b["labels"][:, 1:] != IGNORE_INDEX).to(z.dtype)
                    forms = _forms(z[:, :-1], jg[:, :-1], jh[:, :-1], d2[:, :-1], mask.to(torch.float64))
                    for k in acc:
                        acc[k] += forms[k] / total
                    del d2
                    p = F.softmax(z[:, :-1], -1)
                    _, pull = vjp(f, *self._primals())
                    for jv, out in ((jg, outs[0]), (jh, outs[1])):
                        self._accumulate(out, pull(_output_hessian_times(p, jv, mask, total).to(z.dtype)))
                    del pull, p, jg, jh, z
        finally:
            self.model.train(was)
        summed = self._reduce(torch.tensor(list(acc.values()), dtype=torch.float64, device=self.device))
        return self._reduce(outs[0]), self._reduce(outs[1]), dict(zip(acc, summed.tolist()))

    def per_sequence_gram(self, basis: torch.Tensor) -> torch.Tensor:
        """A_k = Bᵀ F_k B for every sequence k ([N, d, d]): the operator's per-sequence parts in a
        basis (columns of ``basis``), so that Bᵀ F B = mean_k A_k (``per="sequence"``)."""
        if self.layout is not None:
            raise NotImplementedError(
                "a model sharded with FSDP2 has no forward-mode derivative through its parameters"
            )
        tangents = [tuple(self._unflat(basis[:, j]).values()) for j in range(basis.shape[1])]
        out = []
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            for b in self._batches(sharded=False):
                f = self._logits_fn(b)
                jvs, p = [], None
                for tan in tangents:
                    logits, jv = jvp(f, self._primals(), tan)
                    jvs.append(jv[:, :-1].detach())
                    if p is None:
                        p = F.softmax(logits[:, :-1].detach(), -1)
                J = torch.stack(jvs, 1)  # [B, d, T, V]
                mask = (b["labels"][:, 1:] != IGNORE_INDEX).to(J.dtype)
                pj = (p.unsqueeze(1) * J).sum(-1)  # [B, d, T]
                A = torch.einsum("bitv,bjtv,btv,bt->bij", J, J, p, mask) - torch.einsum("bit,bjt,bt->bij", pj, pj, mask)
                out.append(A.to(torch.float64))
        self.model.train(was)
        return torch.cat(out)

    @torch.no_grad()
    def expansion_forms(self, g: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
        """The Fisher-weighted forms of the logit change along θ(t) = θ* − t g + (t²/2) h + O(t³).

        Δz(t) = −t J g + (t²/2) q + O(t³) with q = J h + ∇²z[g, g] (the second directional
        derivative of the logits along g, by forward-over-forward jvp), so with this operator's
        weighting (A = diag p − p pᵀ per response token, ``per``-normalised)
        Δu(t) = ½ (t² gᵀFg − t³ (Jg)ᵀA q + ¼ t⁴ qᵀA q) + O(t⁵ when Jg = 0).
        Returns ``gFg``, ``gAq``, ``qAq``, ``hFh`` (= (Jh)ᵀA(Jh), the Gauss-Newton part only) and
        ``dAd`` (the ∇²z[g, g] part only). The paper's γ²/8 is the Gauss-Newton part within M.
        """
        if self.layout is not None:
            raise NotImplementedError(
                "a model sharded with FSDP2 has no forward-mode derivative through its parameters"
            )
        total = self._total_tokens() if self.per == "token" else len(self.data)
        gs, hs = tuple(self._unflat(g).values()), tuple(self._unflat(h).values())
        acc = {"gFg": 0.0, "gAq": 0.0, "qAq": 0.0, "hFh": 0.0, "dAd": 0.0}
        was = self.model.training
        self.model.eval()
        for batch in self._batches():
            for b in self._row_chunks(batch):
                f = self._logits_fn(b)
                mask = (b["labels"][:, 1:] != IGNORE_INDEX).to(torch.float64)
                forms = logit_expansion_forms(lambda *ps, f=f: f(*ps)[:, :-1], self._primals(), gs, hs, mask)
                for k in acc:
                    acc[k] += forms[k] / total
        self.model.train(was)
        summed = self._reduce(torch.tensor(list(acc.values()), dtype=torch.float64, device=self.device))
        return dict(zip(acc, summed.tolist()))


def _output_hessian_times(p: torch.Tensor, jv: torch.Tensor, mask: torch.Tensor, total: float) -> torch.Tensor:
    """H_out (J v) for softmax cross-entropy, (diag p − p pᵀ) J v at each response position
    (``p``: [B, T−1, V] softmax of the logits before the last position, ``jv``: [B, T, V]), masked,
    divided by ``total`` and zero at the last position: the cotangent the GGN pulls back."""
    jvs = jv[:, :-1]
    hjv = (p * jvs - p * (p * jvs).sum(-1, keepdim=True)) * mask.unsqueeze(-1) / total
    return torch.cat([hjv, torch.zeros_like(jv[:, -1:])], dim=1)


@contextlib.contextmanager
def composite_activations():
    """SiLU and GELU as compositions of elementary ops while active.

    PyTorch's fused kernels have no forward-over-forward derivative (``aten::silu_backward`` has no
    forward AD); the compositions x/(1+e^{−x}) and the tanh form of GELU do, with the same values up
    to rounding. Only module-level functions are swapped, and always restored."""
    saved = {name: getattr(F, name) for name in ("silu", "gelu")}

    def silu(x, inplace=False):
        return x / (1 + torch.exp(-x))

    def gelu(x, approximate="none"):
        if approximate == "tanh":
            return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + torch.erf(x * 0.7071067811865476))

    F.silu, F.gelu = silu, gelu
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def logit_expansion_forms(f, primals: tuple, g: tuple, h: tuple, mask: torch.Tensor) -> dict[str, float]:
    """For logits z = f(*primals) [..., V] and tangents g, h: with q = J h + ∇²z[g, g] and
    A = diag p − p pᵀ (p = softmax z) per position weighted by ``mask`` [...], the sums
    (Jg)ᵀA(Jg), (Jg)ᵀA q, qᵀA q, (Jh)ᵀA(Jh) and dᵀA d (d = ∇²z[g, g]), in float64."""
    with composite_activations():
        # z, J g and ∇²z[g, g] from one forward-over-forward pass (the outer primal is (z, J g)).
        (z, jg), (_, d2) = jvp(lambda *ps: jvp(f, ps, g), primals, g)
        _, jh = jvp(f, primals, h)
    return _forms(z, jg, jh, d2, mask)


def _forms(z, jg, jh, d2, mask) -> dict[str, float]:
    """:func:`logit_expansion_forms` from the logits and their derivatives (any float dtype)."""
    p = F.softmax(z.detach().to(torch.float64), -1)
    jg, jh, d2 = (x.detach().to(torch.float64) for x in (jg, jh, d2))
    q = jh + d2

    def form(a, b):
        return float(((p * a * b).sum(-1) - (p * a).sum(-1) * (p * b).sum(-1)).mul(mask).sum())

    return {"gFg": form(jg, jg), "gAq": form(jg, q), "qAq": form(q, q), "hFh": form(jh, jh), "dAd": form(d2, d2)}


class FisherOperator(_FunctionalMixin, CurvatureOperator):
    """F v = (1/N) Gᵀ (G v), rows of G the per-sequence gradients (matrix-free)."""

    def _losses_fn(self, b):
        f = self._logits_fn(b)

        def losses(*tensors):
            return nll_from_logits(f(*tensors), b["labels"])

        return losses

    @torch.no_grad()
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        N = len(self.data)
        vs = tuple(self._unflat(v).values())
        out = self.zeros()
        was = self.model.training
        self.model.eval()
        for b in self._batches():
            fn = self._losses_fn(b)
            _, gv = jvp(fn, self._primals(), vs)
            _, pull = vjp(fn, *self._primals())
            out += torch.cat([t.reshape(-1) for t in pull(gv)]).to(self.acc_dtype) / N
            del pull, gv  # the vjp's saved activations, not beside the next batch's
        self.model.train(was)
        return self._reduce(out)


def rademacher(op: CurvatureOperator, generator: torch.Generator) -> torch.Tensor:
    """A ±1 probe for Hutchinson's trace estimator: drawn on the CPU from ``generator`` (the same
    numbers on every device and rank), then moved to the operator's device in its ``acc_dtype``."""
    z = torch.randint(0, 2, (op.n,), generator=generator) * 2 - 1
    return z.to(device=op.device, dtype=op.acc_dtype)


def top_eigenpairs(
    op: CurvatureOperator, k: int = 1, which: str = "LA", tol: float = 1e-8, seed: int = 0, maxiter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a symmetric operator by restarted Lanczos (scipy ``eigsh``), descending.
    With ``maxiter``, a run that has not converged returns the Ritz pairs it has."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(op.n)
    try:
        vals, vecs = eigsh(op.to_scipy(), k=k, which=which, tol=tol, v0=v0, maxiter=maxiter)
    except ArpackNoConvergence as e:
        if len(e.eigenvalues) == 0:
            raise
        vals, vecs = e.eigenvalues, e.eigenvectors
    order = np.argsort(vals)[::-1]
    return torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy())
