r"""Log-likelihoods and bits/dim of whole data sets: :func:`log_likelihood` batch by batch
through :func:`~flowsolve.likelihood.dataset.evaluate_dataset` (batched, resumable, with a
progress line, sharded across torch.distributed ranks).

:func:`dataset_log_likelihood` returns a :class:`DatasetLikelihood` (per-sample values, their
mean and its standard error) and :func:`dataset_bits_per_dim` a
:class:`~flowsolve.likelihood.bits.BitsPerDim`; both resume from a checkpoint that records
everything their numbers depend on (:func:`field_fingerprint` and the settings).
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._core.files import checksum
from .._core.threads import intra_op_threads
from .._core.types import Field
from .augmented import divergence_label as _divergence_label
from .augmented import qualname as _qualname
from .augmented import shown_name as _shown_name
from .bits import (
    BitsPerDim,
    check_draws,
    check_range,
    discrete_bits_per_dim,
    estimator_label,
)
from .cnf import log_likelihood
from .dataset import MAY_CHANGE, evaluate_dataset

__all__ = [
    "DatasetLikelihood",
    "field_fingerprint",
    "dataset_log_likelihood",
    "dataset_bits_per_dim",
]


@dataclass(frozen=True, eq=False)
class DatasetLikelihood:
    """What :func:`dataset_log_likelihood` returns (``N`` samples, in data-set order, on the
    CPU).

    Attributes:
        log_prob: ``log p_{t_hi}(x_n)`` in nats, ``(N,)``.
        stderr: ``(N,)`` standard error of each sample's Hutchinson estimate across its
            probe channels (NaN for ``n_probes=1``); ``None`` for the exact divergence.
        nfe: ``(N,)``: the NFE of the solve of the batch holding each sample (with
            ``step_control="per_sample"``: the evaluations of that sample itself).
        divergence: ``"exact (<method>)"`` or ``"hutchinson (<probe>, k=<k>)"``.

    The aggregate over the data set is derived, never stored: :attr:`mean_log_prob` and its
    standard error :attr:`mean_log_prob_stderr`.

    For code written when the result was a dict, ``res["log_prob"]``, ``res["nfe"]``,
    ``res["stderr"]`` (Hutchinson only, else KeyError), ``res.keys()``, ``"stderr" in res``
    and ``dict(res)`` work as before.
    """

    log_prob: Tensor
    stderr: Tensor | None
    nfe: Tensor
    divergence: str

    @property
    def mean_log_prob(self) -> Tensor:
        """The data set's log-likelihood: the mean of :attr:`log_prob` over its ``N``
        samples, in nats (0-d)."""
        return self.log_prob.mean()

    @property
    def mean_log_prob_stderr(self) -> Tensor:
        """Standard error of :attr:`mean_log_prob`, ``sqrt(sum_n (lp_n - mean)^2 / (N - 1)) /
        sqrt(N)`` from all ``N`` per-sample values; NaN for ``N < 2`` (0-d).

        It covers the spread of the data and, for Hutchinson, of the probes (each sample's
        estimate has its own independent probes, so their variance is part of the spread
        of the per-sample values): no separate Hutchinson term is to be added. It does not
        cover the solver's discretisation error, a bias shared by all samples (tighten
        ``rtol`` / ``atol`` or add ``steps`` to see it)."""
        n = self.log_prob.numel()
        if n < 2:
            return torch.full((), float("nan"), dtype=self.log_prob.dtype,
                              device=self.log_prob.device)
        return self.log_prob.std(unbiased=True) / math.sqrt(n)

    # -- the dict of earlier versions -----------------------------------------------------
    def keys(self) -> tuple[str, ...]:
        """``("log_prob", "nfe")``, and ``"stderr"`` for Hutchinson: the keys of the dict
        this function returned before."""
        return ("log_prob", "nfe") + (("stderr",) if self.stderr is not None else ())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.keys():
            raise KeyError(f"{key!r}: a DatasetLikelihood has the keys {list(self.keys())} "
                           "(stderr for Hutchinson only) and the attributes log_prob, stderr, "
                           "nfe, divergence, mean_log_prob, mean_log_prob_stderr")
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default


# -- what a data-set checkpoint records ------------------------------------------------
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_DEPTH = 6  # how far the walk follows attributes, closures and referenced globals


def _walk(obj: object, where: str, tensors: dict, plain: dict, depth: int, seen: set) -> None:
    """Collect the tensors and plain values reachable from ``obj`` (see
    :func:`field_fingerprint`) into ``tensors`` / ``plain``, keyed by how they were
    reached."""
    if isinstance(obj, _SCALARS):
        plain[where] = obj
        return
    if torch.is_tensor(obj):
        tensors[where] = obj
        return
    if depth <= 0 or id(obj) in seen or isinstance(obj, (types.ModuleType, type)):
        return
    seen.add(id(obj))

    def walk(value: object, key: str) -> None:
        _walk(value, key, tensors, plain, depth - 1, seen)

    if isinstance(obj, nn.Module):
        for name, tensor in obj.state_dict().items():
            tensors[f"{where}.{name}"] = tensor
        for name, module in obj.named_modules():
            at = f"{where}.{name}" if name else where
            plain[f"{at}:class"] = _qualname(module)
            for attr, value in sorted(vars(module).items()):
                if not attr.startswith("_"):  # training, and settings such as in_features
                    walk(value, f"{at}.{attr}")
    elif isinstance(obj, functools.partial):
        walk(obj.func, f"{where}.func")
        walk(obj.args, f"{where}.args")
        for name, value in sorted(obj.keywords.items()):
            walk(value, f"{where}.{name}")
    elif isinstance(obj, types.MethodType):
        plain[f"{where}:function"] = _qualname(obj)
        walk(obj.__self__, f"{where}.__self__")
    elif isinstance(obj, types.FunctionType):
        plain[f"{where}:function"] = _qualname(obj)
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or (), strict=False):
            try:
                walk(cell.cell_contents, f"{where}.{name}")
            except ValueError:  # a cell not yet filled
                pass
        for name in code.co_names:  # the module-level names it reads
            if name in obj.__globals__:
                walk(obj.__globals__[name], f"{where}.{name}")
        walk(obj.__defaults__, f"{where}.__defaults__")
        for name, value in sorted((obj.__kwdefaults__ or {}).items()):
            walk(value, f"{where}.{name}")
    elif isinstance(obj, tuple):
        for k, value in enumerate(obj):
            walk(value, f"{where}[{k}]")
    elif isinstance(obj, (list, dict, set, frozenset, bytearray)):
        return  # mutable containers hold state (caches, logs, counters), not settings
    elif isinstance(getattr(obj, "__dict__", None), dict):
        plain[f"{where}:class"] = _qualname(obj)
        for attr, value in sorted(vars(obj).items()):
            walk(value, f"{where}.{attr}")


def field_fingerprint(field: object, name: str = "field") -> dict[str, str | None]:
    """What a data-set checkpoint records of a field (or a prior) and compares on resume.

    ``{name: the qualified name, name + " weights": hash of its tensors,
    name + " settings": hash of its plain values}``, hashes ``"sha256:<16 hex>"`` over the
    dtype, shape and bytes of each tensor (:func:`flowsolve._core.files.checksum`), or None
    where there is none. The tensors and values are those reachable from ``field``:

    - an ``nn.Module``: its ``state_dict`` (parameters and buffers), the class and the
      public attributes (``training``, ``in_features``, ...) of every submodule;
    - a function: what its closure holds, the module-level names it reads, its defaults
      (``lambda x, t: net(x, t)`` records ``net``'s weights);
    - a bound method: its object; a ``functools.partial``: its function and arguments;
    - any other object (``fs.probability_flow(score, path)``, ``fs.analytic`` fields, a
      ``torch.distributions`` prior): its attributes, recursively,

    followed through tuples, to a depth of 6. Lists, dicts and sets are not followed: they
    hold caches, logs and counters, which change between calls without changing the
    numbers. A plain function that reaches its model by other means (an argument default
    that is a list, a dict entry, a file it loads) records its qualified name only: a
    resume with other weights behind the same name is then not detected; pass the
    ``nn.Module`` itself, or a closure over it.
    """
    tensors: dict[str, Tensor] = {}
    plain: dict[str, object] = {}
    _walk(field, "", tensors, plain, _DEPTH, set())

    def digest(values: dict) -> str | None:
        return f"sha256:{checksum(values)[:16]}" if values else None

    return {name: _shown_name(field) if field is not None else "None",
            f"{name} weights": digest(tensors), f"{name} settings": digest(plain)}


_NOT_SETTINGS = frozenset({"field", "x", "generator", "prior", "solver_options", *MAY_CHANGE})


def _settings_fingerprint(evaluation: str, field: Field, seed: int,
                          kwargs: dict[str, Any]) -> dict[str, Any]:
    """Everything :func:`log_likelihood` with ``kwargs`` (defaults filled in) computes from,
    besides the data: the field, the prior, the solver and its options, the divergence
    (the probes only for Hutchinson), the t interval and the seed."""
    try:
        bound = inspect.signature(log_likelihood).bind_partial(**kwargs)
    except TypeError as err:
        raise TypeError(f"{evaluation}: {err}") from None
    bound.apply_defaults()
    args = bound.arguments
    record: dict[str, Any] = {"evaluation": evaluation, "seed": seed}
    record.update(field_fingerprint(field, "field"))
    record.update(field_fingerprint(args["prior"], "prior") if args["prior"] is not None
                  else {"prior": "N(0, I)"})
    hutchinson = args["divergence"] == "hutchinson"
    for key, value in args.items():
        if key not in _NOT_SETTINGS and (hutchinson or key not in ("n_probes", "probe")):
            record[key] = _plain_value(value)
    for key, value in sorted(args["solver_options"].items()):
        record[f"solver option {key}"] = _plain_value(value)
    return record


def _plain_value(value: object) -> object:
    """``value`` as the checkpoint stores it: plain values as they are, tuples and lists as
    tuples, a dtype as its name, anything else as its name and hashes."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain_value(v) for v in value)
    if isinstance(value, torch.dtype):
        return str(value)
    return " ".join(str(v) for v in field_fingerprint(value, "value").values())


def dataset_log_likelihood(
    field: Field,
    data: Tensor | Sequence,
    *,
    batch_size: int = 256,
    seed: int = 0,
    checkpoint: str | None = None,
    progress: bool = True,
    threads: int | None = None,
    **kwargs: Any,
) -> DatasetLikelihood:
    """:func:`log_likelihood` over a whole data set: batched, resumable (``checkpoint``),
    with a progress line, sharded across torch.distributed ranks (see
    :func:`~flowsolve.likelihood.dataset.evaluate_dataset`). Hutchinson probes of the batch
    starting at sample ``i`` come from a generator seeded with ``seed + i``.

    Args:
        field: the velocity ``(x, t) -> Tensor``.
        data: a tensor ``(N, *event_shape)`` or an indexable data set of such tensors (or
            of ``(tensor, label, ...)`` tuples); empty: ValueError.
        batch_size, progress: as :func:`~flowsolve.likelihood.dataset.evaluate_dataset`.
        threads: torch's intra-op threads for the evaluation, restored afterwards (None:
            torch's setting; on a shared CPU one thread is often faster).
        seed: the batch starting at sample ``i`` draws its probes from a generator seeded
            ``seed + i`` (no ``generator=``: TypeError).
        checkpoint: a file to resume from after an interruption. It records everything
            the numbers depend on, and a resume that differs in any of it raises ValueError
            naming every difference: the data (a hash of the samples already evaluated),
            the number of samples, ``batch_size``, the ranks, ``seed``, the field
            (:func:`field_fingerprint`: its weights when it is an ``nn.Module`` or holds
            one, else its qualified name and the tensors and values it holds), the prior
            (likewise), ``solver``, ``steps``, ``rtol``, ``atol``, ``divergence``,
            ``n_probes`` and ``probe`` (Hutchinson), ``t_interval`` and the solver's extra
            options. ``chunk_size``, ``create_graph``, ``adjoint`` and ``progress`` may
            change. A checkpoint written before these were recorded (it holds the number of
            samples and the batch size only) still resumes, with a warning.
        kwargs: as :func:`log_likelihood`.

    Returns:
        :class:`DatasetLikelihood`: per-sample ``log_prob``, ``stderr`` (Hutchinson) and
        ``nfe``, ``(N,)`` in data-set order, with ``mean_log_prob`` and its standard error
        ``mean_log_prob_stderr``. ``res["log_prob"]`` (and ``"stderr"``, ``"nfe"``) still
        index it as the dict this function returned before.
    """
    if "generator" in kwargs:
        raise TypeError("dataset_log_likelihood takes seed=, not generator=: the probes of the "
                        "batch starting at sample i come from a generator seeded with seed + i "
                        "(the same draws after resuming and on any number of ranks)")
    fingerprint = None if checkpoint is None else \
        _settings_fingerprint("dataset_log_likelihood", field, seed, kwargs)

    def one_batch(batch: Tensor, offset: int) -> dict[str, Tensor]:
        gen = torch.Generator(device=batch.device).manual_seed(seed + offset)
        res = log_likelihood(field, batch, generator=gen, **kwargs)
        nfe = (torch.full_like(res.log_prob, res.nfe) if res.nfe_per_sample is None
               else res.nfe_per_sample.to(res.log_prob))
        out = {"log_prob": res.log_prob, "nfe": nfe}
        if res.stderr is not None:
            out["stderr"] = res.stderr
        return out

    with intra_op_threads(threads):
        out = evaluate_dataset(one_batch, data, batch_size=batch_size, checkpoint=checkpoint,
                               progress=progress, label="log-likelihood", fingerprint=fingerprint)
    return DatasetLikelihood(log_prob=out["log_prob"], stderr=out.get("stderr"), nfe=out["nfe"],
                             divergence=_divergence_label(**{
                                 k: v for k, v in kwargs.items()
                                 if k in ("divergence", "n_probes", "probe")}))


def dataset_bits_per_dim(
    field: Field,
    k: Tensor | Sequence,
    *,
    draws: int = 1,
    importance_weighted: bool = False,
    n_bins: int = 256,
    low: float = -1.0,
    high: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    checkpoint: str | None = None,
    progress: bool = True,
    threads: int | None = None,
    **kwargs: Any,
) -> BitsPerDim:
    r"""Bits/dim of integer data ``k`` under the flow of ``field`` with uniform
    dequantisation (see :mod:`flowsolve.likelihood.bits`), batched, resumable (``checkpoint``),
    with a progress line and sharded across torch.distributed ranks like
    :func:`dataset_log_likelihood` (through :func:`flowsolve.likelihood.dataset.evaluate_dataset`).

    The batch starting at sample ``i`` draws everything from one generator seeded with
    ``seed + i``, in this order for each of the ``K = draws`` draws: the noise
    ``u ~ U[0, 1)`` with the batch's shape, then the Hutchinson probes of that draw's solve
    (if ``divergence="hutchinson"``). A resumed run therefore repeats the same draws; the
    draws depend on the batch boundaries, so results are reproducible for a fixed
    ``batch_size`` and number of ranks. For sample ``n`` of ``D`` entries, with
    ``y_{n,j} = low + (high - low) (k_n + u_{n,j}) / n_bins``,

        log p_z(n, j) = log p_1(y_{n,j}) + D log((high - low) / n_bins),
        bpd_n = -(1/K) sum_j log p_z(n, j) / (D ln 2)                 (mean of K = 1),
        bpd_n = -log((1/K) sum_j exp log p_z(n, j)) / (D ln 2)        (importance_weighted),

    and the data set's bits/dim is ``mean_bpd = (1/N) sum_n bpd_n`` with standard error
    ``std(bpd_1..N) / sqrt(N)`` over all ``N`` samples (:attr:`BitsPerDim.mean_bpd`,
    :attr:`BitsPerDim.mean_bpd_stderr`).

    Args:
        field: the velocity ``(x, t) -> Tensor``.
        k: integers in ``[0, n_bins)``, a tensor ``(N, *event_shape)`` or an indexable data
            set of such tensors (or of ``(tensor, label, ...)`` tuples).
        draws, importance_weighted, n_bins, low, high: the dequantisation and the bound,
            as :func:`flowsolve.likelihood.bits.discrete_bits_per_dim`.
        batch_size, progress, threads: as :func:`dataset_log_likelihood`.
        checkpoint: a file to resume from, as :func:`dataset_log_likelihood`: it also
            records ``draws``, ``importance_weighted``, ``n_bins``, ``low``, ``high`` and
            ``dtype``, and a resume that differs in any recorded value raises ValueError
            naming every difference.
        seed: the batch starting at sample ``i`` draws from a generator seeded ``seed + i``
            (no ``generator=``: TypeError).
        kwargs: as :func:`log_likelihood`; ``dtype`` (default float64) is the dtype of the
            dequantised points.

    Returns:
        :class:`~flowsolve.likelihood.bits.BitsPerDim` with ``bpd`` and ``nll_nats`` of shape
        ``(N,)`` in data-set order (on the CPU, as :func:`~.dataset.evaluate_dataset`
        gathers them).
    """
    if "generator" in kwargs:
        raise TypeError("dataset_bits_per_dim takes seed=, not generator=: the dequantisation "
                        "noise and probes of the batch starting at sample i come from a "
                        "generator seeded with seed + i (the same draws after resuming)")
    check_draws(draws)
    check_range(n_bins, low, high)
    dtype = kwargs.pop("dtype", torch.float64)
    fingerprint = None
    if checkpoint is not None:
        fingerprint = _settings_fingerprint("dataset_bits_per_dim", field, seed, kwargs)
        fingerprint.update(draws=draws, importance_weighted=bool(importance_weighted),
                           n_bins=n_bins, low=float(low), high=float(high), dtype=str(dtype))

    def one_batch(batch: Tensor, offset: int) -> dict[str, Tensor]:
        gen = torch.Generator(device=batch.device).manual_seed(seed + offset)

        def log_prob(y: Tensor) -> Tensor:
            return log_likelihood(field, y, generator=gen, **kwargs).log_prob

        res = discrete_bits_per_dim(log_prob, batch, draws=draws,
                                    importance_weighted=importance_weighted, n_bins=n_bins,
                                    low=low, high=high, generator=gen, dtype=dtype)
        return {"bpd": res.bpd, "nll_nats": res.nll_nats}

    with intra_op_threads(threads):
        out = evaluate_dataset(one_batch, k, batch_size=batch_size, checkpoint=checkpoint,
                               progress=progress, label="bits/dim", fingerprint=fingerprint)
    return BitsPerDim(bpd=out["bpd"], nll_nats=out["nll_nats"],
                      estimator=estimator_label(draws, importance_weighted), draws=draws)
