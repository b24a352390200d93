r"""Divergence of a field: exact (vectorised Jacobian trace) and Hutchinson estimates.

The instantaneous change of variables of a continuous normalising flow needs, at every
evaluation of the ODE right-hand side, both the velocity and its divergence

    div u_t(x) = tr J(x),   J_ij = d u_i / d x_j,

taken per sample over the ``d = prod(event_shape)`` entries of one sample of ``x`` of shape
``(B, *event_shape)``. :func:`value_and_divergence` returns both from one forward pass.

Exact methods (all compute the ``d`` diagonal entries ``e_i^T J e_i`` with one-hot ``e_i``):

* ``"vmap-jacrev"``: ``torch.func.vmap`` over the batch of one reverse-mode pass per sample
  (the field sees one sample as a batch of one), ``d`` vector-Jacobian products vmapped;
* ``"vmap-jacfwd"``: the same with ``d`` forward-mode Jacobian-vector products (needs
  forward-AD formulas for every op of the field);
* ``"batched-vjp"``: one batched forward, then chunks of one-hot cotangents
  ``V`` of shape ``(chunk, B, *event_shape)`` pushed through one batched backward,
  ``torch.autograd.grad(u, x, V, is_grads_batched=True)``; never forms the Jacobian (nor
  the ``d x d`` identity: each chunk's cotangents are built on their own), works on any
  batched model, memory bounded by ``chunk_size``. With ``create_graph=True`` the batched
  backward is instead ``torch.func.vjp`` of the batched field, vmapped over the
  cotangents (the same divergence; its gradients agree to rounding), because torch's
  ``is_grads_batched`` double backward fails for ``nn.GroupNorm`` (torch 2.x; "The size
  of tensor a ... must match"), i.e. for :class:`flowsolve.training.unet.UNet`; the field is
  still called once on the whole batch, and Python control flow on values still works
  (only the backward is vmapped);
* ``"loop"``: a Python loop of ``d`` backward passes, the ``i``-th
  ``grad(u.reshape(B, d)[:, i].sum(), x)`` (output entry ``i`` of the flattened event,
  summed over the batch); the fallback for models that ``torch.func`` cannot transform.

Per-sample independence is assumed: sample ``b`` of the output depends only on sample ``b``
of the input. ``"batched-vjp"``, ``"loop"`` and Hutchinson differentiate the batch sum, so a
field that mixes samples (a BatchNorm layer in training mode) silently gets a wrong trace.
An ``nn.Module`` (or a bound method or ``functools.partial`` of one) that holds a batch-norm
layer in training mode is therefore refused with a ValueError; call ``model.eval()``.
Other sample-mixing code cannot be detected.

Hutchinson's estimator (Hutchinson 1989; FFJORD, Grathwohl et al. 2019): for probes with
``E[e e^T] = I``, ``tr J = E[e^T J e]``. With ``k`` probes ``e_1..e_k`` per sample,

    div ~= mean_j e_j^T J e_j,   stderr = std_j(e_j^T J e_j) / sqrt(k),

all ``k`` vector-Jacobian products in one batched backward (``torch.func.vjp`` vmapped
over the probes with ``create_graph=True`` and ``k > 1``, as for ``"batched-vjp"``). With
``S = (J + J^T) / 2`` the symmetric part of ``J`` (``e^T J e = e^T S e``), Rademacher
probes (entries +-1) have variance ``2 sum_{i != j} S_ij^2`` (only off-diagonal entries;
exact when ``S`` is diagonal, e.g. ``J = c I``), Gaussian probes ``2 ||S||_F^2``. Probes
must stay fixed for a whole ODE solve (:func:`make_probes` once, then pass them to every
call).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._core.checks import generator_or_fresh
from .._core.types import Field

__all__ = [
    "DIVERGENCE_METHODS",
    "EXACT_METHODS",
    "PROBE_KINDS",
    "DivergenceResult",
    "auto_method",
    "default_chunk",
    "divergence",
    "make_probes",
    "value_and_divergence",
]


# Cotangent budget of one batched backward: chunk * B * d <= this many elements.
_CHUNK_BUDGET = 2**25


@dataclass(frozen=True)
class DivergenceResult:
    """What :func:`value_and_divergence` returns.

    Attributes:
        value: the field ``u(x, t)``, shaped like ``x``.
        divergence: ``(B,)``, the exact trace or the Hutchinson mean over probes.
        stderr: ``(B,)`` standard error of the Hutchinson mean across probes
            (``std_j / sqrt(k)``; NaN for a single probe); ``None`` for exact methods.
        estimates: ``(k, B)`` per-probe estimates ``e_j^T J e_j`` (Hutchinson; carry them as
            ``k`` log-density channels of one solve); ``None`` for exact methods.
        method: the method that ran (``"auto"`` resolved to its choice).
    """

    value: Tensor
    divergence: Tensor
    stderr: Tensor | None
    estimates: Tensor | None
    method: str


# ----------------------------------------------------------------------------- checks
def _check_per_sample(field: object) -> None:
    """Refuse a module holding a training-mode batch-norm layer (it couples samples)."""
    while isinstance(field, functools.partial):
        field = field.func
    owner = getattr(field, "__self__", None)
    module = field if isinstance(field, nn.Module) else owner
    if not isinstance(module, nn.Module):
        return
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            where = name or type(module).__name__
            raise ValueError(
                f"field holds a batch-norm layer in training mode ({where}: "
                f"{type(sub).__name__}), which couples the samples of a batch, so the "
                "per-sample divergence is undefined; call model.eval() first"
            )


def _check_inputs(field: object, x: object, t: object) -> tuple[Tensor, Tensor]:
    if not callable(field):
        raise TypeError(f"field must be callable (x, t) -> Tensor; got {type(field).__name__}")
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be shaped (B, *event_shape) with B >= 1; got {tuple(x.shape)}")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and t.shape[0] == 1 and x.shape[0] != 1:
        t = t.reshape(())
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(
            f"t must be 0-d or shaped (B,) = ({x.shape[0]},) to match x of shape "
            f"{tuple(x.shape)}; got t of shape {tuple(t.shape)}"
        )
    return x, t


def _check_output(u: Tensor, shape: torch.Size) -> None:
    if not torch.is_tensor(u) or u.shape != shape:
        got = tuple(u.shape) if torch.is_tensor(u) else type(u).__name__
        raise ValueError(f"field must return a tensor shaped like x {tuple(shape)}; got {got}")


def _check_chunk(chunk_size: object) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")


def default_chunk(x: Tensor) -> int:
    """Output dimensions per batched backward when ``chunk_size=None`` ("batched-vjp"):
    ``clamp(2^25 // x.numel(), 1, d)`` one-hot cotangents (at most 2^25 cotangent
    entries, 128 MiB in float32, per backward)."""
    d = x[0].numel()
    return max(1, min(d, _CHUNK_BUDGET // max(1, x.numel())))


def auto_method(x: Tensor, create_graph: bool = False) -> str:
    """The exact method ``method="auto"`` picks for ``x``.

    Rule: on CUDA and other accelerators ``"batched-vjp"`` (measured on an H100: within 20%
    of ``vmap-jacrev`` at d <= 256 with 6-19x less memory, and it calls the field on the
    whole batch, so fields that ``torch.func`` cannot transform work too). On CPU, where
    every exact method costs about ``d`` backward passes, ``"loop"`` without
    ``create_graph`` (fastest or within 10% of the fastest for the MLP 3x256 at B=256,
    d = 2..256, and the least memory) and ``"batched-vjp"`` with it (1.4-2x faster than the
    loop, which keeps ``d`` graphs); ``benchmarks/bench_divergence.py``.
    """
    if x.device.type == "cpu" and not create_graph:
        return "loop"
    return "batched-vjp"


def _requires_grad(x: Tensor) -> Tensor:
    # keep x's own graph (gradients to whatever produced x) when it has one
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _vjp(u: Tensor, xg: Tensor, v: Tensor | None, **kwargs) -> Tensor:
    """``v^T du/dx``, shaped ``(c, *x.shape)`` for ``c`` batched cotangents
    (``is_grads_batched=True``), else like ``x``; zero where ``u`` does not depend on ``x``
    (a constant field, or one that depends on parameters only)."""
    batched = kwargs.get("is_grads_batched", False)
    if not u.requires_grad:
        shape = (v.shape[0], *xg.shape) if batched else xg.shape
        return torch.zeros(shape, dtype=xg.dtype, device=xg.device)
    (g,) = torch.autograd.grad(u, xg, v, allow_unused=True, materialize_grads=True, **kwargs)
    if batched and g.dim() == xg.dim():  # unused x: materialized zeros shaped like x only
        g = g.expand(v.shape[0], *xg.shape)
    return g


def _func_pullback(field: Field, xg: Tensor, t: Tensor) -> tuple[Tensor, Callable]:
    """``u = field(xg, t)`` (one batched call) and ``V -> V^T du/dx`` for stacked cotangents
    ``V`` ``(c, *x.shape)``, by ``torch.func.vjp`` vmapped over ``V``. The result keeps the
    graph to the field's parameters and to ``xg``'s own history (``create_graph=True``);
    unlike ``is_grads_batched`` its double backward works for ``nn.GroupNorm``."""
    from torch.func import vjp, vmap

    def f(z: Tensor) -> Tensor:
        out = field(z, t)
        _check_output(out, xg.shape)
        return out

    u, pullback = vjp(f, xg)

    def pull(v: Tensor) -> Tensor:
        try:
            return vmap(lambda w: pullback(w)[0])(v)
        except RuntimeError as err:
            if not any(s in str(err) for s in ("vmap", "functorch", "batching rule")):
                raise
            raise RuntimeError(
                "create_graph=True batches the backward with torch.func.vmap, which failed "
                "for this field (an op or autograd.Function without a batching rule); use "
                f"method='loop'. torch said: {str(err).splitlines()[0][:200]}"
            ) from err

    return u, pull


def _one_hot(start: int, stop: int, d: int, like: Tensor) -> Tensor:
    """Rows ``start .. stop - 1`` of the ``d x d`` identity, ``(stop - start, d)``, without
    forming the identity (memory ``(stop - start) d``)."""
    e = torch.zeros(stop - start, d, dtype=like.dtype, device=like.device)
    e.diagonal(start).fill_(1)
    return e


def _finish(u: Tensor, div: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    return (u, div) if create_graph else (u.detach(), div.detach())


# ---------------------------------------------------------------------- exact methods
def _batched_vjp(field: Field, x: Tensor, t: Tensor, chunk_size: int | None,
                 create_graph: bool) -> tuple[Tensor, Tensor]:
    """``div_b = sum_i [V_i^T J]_{b,i}`` with one-hot ``V_i``, ``chunk`` of them per backward."""
    b, d = x.shape[0], x[0].numel()
    chunk = default_chunk(x) if chunk_size is None else min(chunk_size, d)
    with torch.enable_grad():
        xg = _requires_grad(x)
        if create_graph:
            u, pull = _func_pullback(field, xg, t)
        else:
            u = field(xg, t)
            _check_output(u, x.shape)
        div = torch.zeros(b, dtype=x.dtype, device=x.device)
        for start in range(0, d, chunk):
            stop = min(start + chunk, d)
            c = stop - start
            v = _one_hot(start, stop, d, x)[:, None, :].expand(c, b, d).reshape(c, *x.shape)
            if create_graph:
                g = pull(v)
            else:
                g = _vjp(u, xg, v, retain_graph=stop < d, is_grads_batched=True)
            # g[j, b, start + j] for j < c: the diagonal of this block of J
            block = g.reshape(c, b, d)[:, :, start:stop]
            div = div + torch.diagonal(block, dim1=0, dim2=2).sum(-1)
    return _finish(u, div, create_graph)


def _loop(field: Field, x: Tensor, t: Tensor, chunk_size: int | None,
          create_graph: bool) -> tuple[Tensor, Tensor]:
    """``div_b = sum_i d(sum_b' u_{b',i}) / d x_{b,i}``, one backward per output entry."""
    b, d = x.shape[0], x[0].numel()
    with torch.enable_grad():
        xg = _requires_grad(x)
        u = field(xg, t)
        _check_output(u, x.shape)
        flat = u.reshape(b, d)
        div = torch.zeros(b, dtype=x.dtype, device=x.device)
        for i in range(d):
            g = _vjp(flat[:, i].sum(), xg, None, retain_graph=create_graph or i < d - 1,
                     create_graph=create_graph)
            div = div + g.reshape(b, d)[:, i]
    return _finish(u, div, create_graph)


def _vmap(field: Field, x: Tensor, t: Tensor, chunk_size: int | None, create_graph: bool,
          forward: bool) -> tuple[Tensor, Tensor]:
    """vmap over the batch of ``sum_i e_i^T J e_i`` for one sample (a batch of one)."""
    from torch.func import jvp, vjp, vmap

    event, d = x.shape[1:], x[0].numel()
    # one-hot basis chunks (chunk_size rows each, never the whole d x d identity when
    # chunked); the diagonal entries are concatenated before the one sum, so the result is
    # that of vmap(..., chunk_size) over the whole basis
    step = d if chunk_size is None else min(chunk_size, d)
    bounds = [(start, min(start + step, d)) for start in range(0, d, step)]

    def one(xi: Tensor, ti: Tensor | None) -> tuple[Tensor, Tensor]:
        def f(z: Tensor) -> Tensor:
            out = field(z.unsqueeze(0), t if ti is None else ti.reshape(1))
            _check_output(out, torch.Size((1, *event)))
            return out.squeeze(0)

        def basis(start: int, stop: int) -> Tensor:
            return _one_hot(start, stop, d, x).reshape(stop - start, *event)

        if forward:
            def diag_fwd(e: Tensor) -> Tensor:
                return (jvp(f, (xi,), (e,))[1] * e).sum()

            y, diag_of = f(xi), vmap(diag_fwd)
        else:
            y, pullback = vjp(f, xi)
            diag_of = vmap(lambda e: (pullback(e)[0] * e).sum())
        diag = [diag_of(basis(start, stop)) for start, stop in bounds]
        return y, (diag[0] if len(diag) == 1 else torch.cat(diag)).sum()

    batched = vmap(one, in_dims=(0, None if t.dim() == 0 else 0))
    try:
        if create_graph:
            u, div = batched(x, None if t.dim() == 0 else t)
        else:
            with torch.no_grad():  # torch.func still differentiates inside; no outer graph
                u, div = batched(x.detach(), None if t.dim() == 0 else t)
    except (RuntimeError, ValueError, IndexError) as err:
        name = "vmap-jacfwd" if forward else "vmap-jacrev"
        bound = _per_sample_bound(field, x.shape[0])
        if bound is not None:  # e.g. functools.partial(net, y=labels), labels (B,)
            raise type(err)(
                f"method={name!r} calls the field on one sample at a time (a batch of one), "
                f"but it carries a per-sample tensor bound with functools.partial ({bound}), "
                "which then no longer matches the batch; use method='batched-vjp' or "
                f"'loop', which call the field on the whole batch. The field said: "
                f"{str(err).splitlines()[0][:200]}"
            ) from err
        if isinstance(err, ValueError | IndexError) or not any(
                s in str(err) for s in ("vmap", "functorch", "forward AD")):
            raise
        raise RuntimeError(
            f"method={name!r} could not transform the field with torch.func (it reads a "
            "per-sample value in Python, calls .item(), or uses an op without a batching or "
            "forward-AD rule); use method='batched-vjp' or 'loop', which call the field on "
            f"the whole batch. torch said: {str(err).splitlines()[0][:200]}"
        ) from err
    return _finish(u, div, create_graph)


def _per_sample_bound(field: object, b: int) -> str | None:
    """Names a tensor argument of shape ``(B, ...)`` bound into ``field`` by
    ``functools.partial`` (``"keyword 'y' of shape (3,)"``), or None (also when B = 1)."""
    while b > 1 and isinstance(field, functools.partial):
        bound = [(f"argument {i + 1}", a) for i, a in enumerate(field.args)]
        bound += [(f"keyword {k!r}", a) for k, a in field.keywords.items()]
        for where, a in bound:
            if torch.is_tensor(a) and a.dim() >= 1 and a.shape[0] == b:
                return f"{where} of shape {tuple(a.shape)}"
        field = field.func
    return None


EXACT_METHODS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "vmap-jacrev": functools.partial(_vmap, forward=False),
    "vmap-jacfwd": functools.partial(_vmap, forward=True),
    "batched-vjp": _batched_vjp,
    "loop": _loop,
}
DIVERGENCE_METHODS: tuple[str, ...] = ("auto", *EXACT_METHODS, "hutchinson")


# ------------------------------------------------------------------------- Hutchinson
def _rademacher(shape: tuple[int, ...], generator, device) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device) * 2 - 1


def _gaussian(shape: tuple[int, ...], generator, device) -> Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float64)


PROBE_KINDS: dict[str, Callable[..., Tensor]] = {"rademacher": _rademacher, "gaussian": _gaussian}


def make_probes(
    shape: tuple[int, ...] | torch.Size,
    n_probes: int = 1,
    kind: str = "rademacher",
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""``n_probes`` Hutchinson probes per sample, ``(n_probes, *shape)`` with
    ``E[e e^T] = I``: Rademacher (entries +-1 with probability 1/2) or standard Gaussian.

    ``shape`` is ``x.shape`` = ``(B, *event_shape)``. Draw them once per ODE solve and pass
    them to every evaluation (a probe redrawn per step makes the dynamics noisy and the
    adaptive step count explode). Randomness only from ``generator`` (drawn on its device,
    then moved to ``device``; None: a fresh unseeded generator on the CPU; torch's global
    RNG is never used); ``dtype`` defaults to torch's default dtype.

    >>> make_probes((2, 3), 4, generator=torch.Generator().manual_seed(0)).abs().unique()
    tensor([1.])
    """
    if isinstance(shape, int) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"shape must be a tuple of ints such as x.shape; got {shape!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an int >= 1; got {n_probes!r}")
    if kind not in PROBE_KINDS:
        raise ValueError(f"kind must be one of {sorted(PROBE_KINDS)}; got {kind!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {generator!r}")
    generator = generator_or_fresh(generator, "cpu")
    gen_device = generator.device
    e = PROBE_KINDS[kind]((n_probes, *shape), generator, gen_device)
    return e.to(dtype=dtype or torch.get_default_dtype(), device=device or gen_device)


def _hutchinson(field: Field, x: Tensor, t: Tensor, probes: Tensor,
                create_graph: bool) -> DivergenceResult:
    k, b = probes.shape[0], x.shape[0]
    with torch.enable_grad():
        xg = _requires_grad(x)
        if k > 1 and create_graph:  # is_grads_batched's double backward fails for GroupNorm
            u, pull = _func_pullback(field, xg, t)
            g = pull(probes)
        else:
            u = field(xg, t)
            _check_output(u, x.shape)
            if k == 1:
                g = _vjp(u, xg, probes[0], create_graph=create_graph).unsqueeze(0)
            else:
                g = _vjp(u, xg, probes, is_grads_batched=True)
        est = (g * probes).reshape(k, b, -1).sum(-1)  # e_j^T J e_j, (k, B)
    mean = est.mean(0)
    if k == 1:
        stderr = torch.full_like(mean, math.nan)
    else:
        stderr = est.std(0, correction=1) / math.sqrt(k)
    if not create_graph:
        u, mean, stderr, est = u.detach(), mean.detach(), stderr.detach(), est.detach()
    return DivergenceResult(u, mean, stderr, est, "hutchinson")


# ------------------------------------------------------------------------ front door
def value_and_divergence(
    field: Field,
    x: Tensor,
    t: Tensor | float,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    probes: Tensor | None = None,
    create_graph: bool = False,
) -> DivergenceResult:
    r"""The field ``u = field(x, t)`` and its divergence ``div u = tr(du/dx)`` per sample.

    Args:
        field: a callable ``(x, t) -> Tensor`` shaped like ``x``, samples independent.
        x: ``(B, *event_shape)``, any event shape (vectors ``(B, d)``, images
            ``(B, C, H, W)``); ``d = prod(event_shape)``.
        t: a number, a 0-d tensor or ``(B,)``.
        method: one of :data:`DIVERGENCE_METHODS`: ``"auto"`` (see :func:`auto_method`),
            an exact method of :data:`EXACT_METHODS`, or ``"hutchinson"`` (needs ``probes``).
        chunk_size: one-hot cotangents (output dimensions) per backward / vmap chunk for
            ``"batched-vjp"``, ``"vmap-jacrev"`` and ``"vmap-jacfwd"``, bounding memory;
            ``None``: :func:`default_chunk` for ``"batched-vjp"``, all ``d`` for vmap.
        probes: ``(k, *x.shape)`` (or ``x.shape`` for ``k = 1``) from :func:`make_probes`,
            fixed for a whole solve; only with ``method="hutchinson"``.
        create_graph: keep the graph so that ``value`` and ``divergence`` can be
            differentiated (to the field's parameters, and to ``x`` if it requires grad),
            e.g. for maximum-likelihood training. Otherwise both come back detached and the
            call works under ``torch.no_grad()`` (it enables grad inside).

    Returns:
        :class:`DivergenceResult` with ``value`` shaped like ``x``, ``divergence`` ``(B,)``
        (and ``stderr``, ``estimates`` for Hutchinson); dtype and device of ``x``.

    >>> res = value_and_divergence(lambda x, t: 3 * x, torch.ones(4, 2, 5), 0.5)
    >>> res.divergence
    tensor([30., 30., 30., 30.])
    """
    if method not in DIVERGENCE_METHODS:
        raise ValueError(f"method must be one of {list(DIVERGENCE_METHODS)}; got {method!r}")
    _check_chunk(chunk_size)
    x, t = _check_inputs(field, x, t)
    _check_per_sample(field)
    if method == "hutchinson":
        if probes is None:
            raise ValueError(
                "method='hutchinson' needs probes (k, *x.shape); draw them once per solve "
                "with make_probes(x.shape, k, generator=...)"
            )
        if not torch.is_tensor(probes):
            raise TypeError(f"probes must be a torch.Tensor; got {type(probes).__name__}")
        if probes.shape == x.shape:
            probes = probes.unsqueeze(0)
        if probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
            raise ValueError(
                f"probes must be shaped (k, *x.shape) = (k, {', '.join(map(str, x.shape))}) "
                f"or x.shape; got {tuple(probes.shape)}"
            )
        return _hutchinson(field, x, t, probes.to(dtype=x.dtype, device=x.device), create_graph)
    if probes is not None:
        raise ValueError(f"probes are used only by method='hutchinson'; got method={method!r}")
    name = auto_method(x, create_graph) if method == "auto" else method
    u, div = EXACT_METHODS[name](field, x, t, chunk_size, create_graph)
    return DivergenceResult(u, div, None, None, name)


def divergence(field: Field, x: Tensor, t: Tensor | float, **kwargs) -> Tensor:
    """``div u`` only, ``(B,)``; keyword arguments as :func:`value_and_divergence`."""
    return value_and_divergence(field, x, t, **kwargs).divergence
