r"""Small networks that follow the field convention ``model(x, t, y=None)``.

``t`` is a 0-d tensor (one time for the whole batch, broadcast) or a ``(B,)`` tensor, in
flow time (0 = source, 1 = data). The forward passes do shape checks only, no value checks
that would read a device tensor, so the models run inside ``torch.func`` transforms and
solver loops without host synchronisation (except the class-label range check, on CPU
tensors outside ``torch.func`` transforms only, so ``vmap`` / ``jacrev`` over labels works).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._core.checks import on_host

__all__ = ["ACTIVATIONS", "SinusoidalTimeEmbedding", "MLP", "initial_weights_from"]

#: activation name -> module class, for :class:`MLP`.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU, "selu": nn.SELU, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU,
    "tanh": nn.Tanh, "softplus": nn.Softplus,
}


@contextmanager
def initial_weights_from(generator: torch.Generator | None) -> Iterator[None]:
    """Modules built inside draw their initial weights from ``generator``.

    ``nn.Module`` initialisers draw from torch's global CPU RNG; here they draw from a forked
    copy of it seeded by one draw from ``generator``, so the same generator state gives the
    same weights and the global RNG is left as it was. ``None``: the global RNG, as usual.

    Example:
        >>> g = lambda: torch.Generator().manual_seed(0)
        >>> with initial_weights_from(g()):
        ...     a = nn.Linear(3, 2)
        >>> with initial_weights_from(g()):
        ...     b = nn.Linear(3, 2)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    if generator is None:
        yield
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


class SinusoidalTimeEmbedding(nn.Module):
    r"""``e(t) = [sin(omega_1 t), ..., sin(omega_h t), cos(omega_1 t), ..., cos(omega_h t)]``.

    ``h = dim / 2`` frequencies spaced log-uniformly from 1 to ``max_frequency``:
    ``omega_k = max_frequency^{(k-1)/(h-1)}``, k = 1..h (``omega_1 = 1`` when h = 1). With
    t in [0, 1] the lowest frequency is a smooth, one-to-one code of t and the highest
    resolves time differences of about ``1 / max_frequency`` (the transformer / DDPM
    embedding, which uses ``1000 t``). Every ``e(t)`` has ``||e(t)||^2 = h``.

    Shapes: ``t`` of any shape (``()`` or ``(B,)``) -> ``(*t.shape, dim)``, in ``t``'s
    floating dtype.
    """

    omega: Tensor

    def __init__(self, dim: int, max_frequency: float = 1000.0):
        super().__init__()
        positive_int(dim, "dim", 2)
        if dim % 2:
            raise ValueError(f"dim must be even (sin and cos pairs); got dim={dim!r}")
        if isinstance(max_frequency, bool) or not isinstance(max_frequency, int | float) or \
                not (math.isfinite(max_frequency) and max_frequency >= 1):
            raise ValueError(f"max_frequency must be a finite number >= 1; got {max_frequency!r}")
        self.dim, self.max_frequency = dim, float(max_frequency)
        half = dim // 2
        exponent = torch.arange(half, dtype=torch.float64) / max(half - 1, 1)
        self.register_buffer("omega", self.max_frequency**exponent, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        if not torch.is_tensor(t):
            raise TypeError(f"t must be a torch.Tensor; got {type(t).__name__}")
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        angle = t.to(dtype)[..., None] * self.omega.to(dtype)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_frequency={self.max_frequency:g}"


class MLP(nn.Module):
    r"""A velocity / score / noise network for vectors: ``f(x, t, y) -> (B, dim)``.

    ``h_0 = [x, e(t), E(y)]`` (``e`` a :class:`SinusoidalTimeEmbedding` of size
    ``time_embedding_dim``, or ``e(t) = t`` itself when ``time_embedding_dim=None``; ``E`` a
    learned label embedding of size ``label_embedding_dim``, only when ``num_classes`` is
    set), then ``depth`` layers ``h <- act(W h + b)`` of width ``hidden`` and a linear
    read-out to ``dim``.

    ``MLP(2, hidden=64, depth=3, time_embedding_dim=None, activation="selu")`` is the network
    of the OT-CFM / [SF]2M 2-D experiments (Tong et al. 2024; torchcfm's ``MLP(2, w=64,
    time_varying=True)``: ``[x, t]``, three 64-wide SELU layers, a linear read-out).

    Class labels run over ``0 .. num_classes - 1``; the extra index ``null_label =
    num_classes`` is the "no label" class of classifier-free guidance (train with
    :func:`flowsolve.training.losses.label_dropout`), and ``y=None`` means the null label.

    Args:
        dim: the event size, ``x`` is ``(B, dim)``.
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        time_embedding_dim: size of ``e(t)`` (even), or ``None`` for the raw time ``t``.
        num_classes: number of labels for a conditional model, ``None`` for none.
        max_frequency: highest frequency of ``e(t)``. The default 30 (not the DDPM / transformer
            1000) keeps the field smooth in t: an ODE solver of order p converges at that
            order only once its step resolves the field's fastest time scale, and with
            frequencies up to 1000 a trained 2-D model's fixed-step errors stalled near 1e-2
            at 32 steps (fitted orders below 1 for euler, midpoint and rk4).
        activation: a name in :data:`ACTIVATIONS` (default ``"silu"``).
        label_embedding_dim: size of ``E(y)``; default ``time_embedding_dim`` (16 with the
            raw time).
        generator: draws the initial weights (:func:`initial_weights_from`); ``None``:
            torch's global RNG.

    Example:
        >>> net = MLP(2, hidden=16, depth=2, time_embedding_dim=8, num_classes=3)
        >>> net(torch.zeros(5, 2), torch.tensor(0.5), y=torch.tensor([0, 1, 2, 3, 0])).shape
        torch.Size([5, 2])
        >>> MLP(2, hidden=64, time_embedding_dim=None, activation="selu").net[0]
        Linear(in_features=3, out_features=64, bias=True)
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_embedding_dim: int | None = 64,
        num_classes: int | None = None,
        max_frequency: float = 30.0,
        activation: str = "silu",
        label_embedding_dim: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        positive_int(hidden, "hidden")
        positive_int(depth, "depth")
        if num_classes is not None:
            positive_int(num_classes, "num_classes")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got "
                             f"{activation!r}")
        if label_embedding_dim is not None and num_classes is None:
            raise ValueError(f"label_embedding_dim={label_embedding_dim!r} needs num_classes "
                             "(an unconditional MLP has no label embedding)")
        self.num_classes = num_classes
        self.time_embedding: SinusoidalTimeEmbedding | None = None
        cond = 1
        if time_embedding_dim is not None:
            try:  # the embedding checks its own size; say which argument it was
                self.time_embedding = SinusoidalTimeEmbedding(time_embedding_dim, max_frequency)
            except ValueError as exc:
                raise ValueError(f"time_embedding_dim={time_embedding_dim!r}: {exc} (or None "
                                 "for the raw time)") from None
            cond = time_embedding_dim
        self.label_embedding: nn.Embedding | None = None
        with initial_weights_from(generator):
            if num_classes is not None:
                size = label_embedding_dim
                if size is None:
                    size = 16 if time_embedding_dim is None else time_embedding_dim
                positive_int(size, "label_embedding_dim")
                self.label_embedding = nn.Embedding(num_classes + 1, size)
                cond += size
            layers: list[nn.Module] = []
            width = dim + cond
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
                width = hidden
            layers.append(nn.Linear(width, dim))
            self.net = nn.Sequential(*layers)

    @property
    def null_label(self) -> int | None:
        """The label index that means "unconditional": ``num_classes`` (None if unconditional)."""
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be shaped (B, {self.dim}); got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        elif t.shape != (b,):
            raise ValueError(
                f"t must be 0-d or shaped (B,) = ({b},) to match x {tuple(x.shape)}; "
                f"got t of shape {tuple(t.shape)}"
            )
        e = t[:, None] if self.time_embedding is None else self.time_embedding(t).to(x.dtype)
        parts = [x, e]
        if self.label_embedding is not None:
            parts.append(self.label_embedding(self._labels(y, b, x.device)).to(x.dtype))
        elif y is not None:
            raise ValueError("y was given but this MLP is unconditional (num_classes=None)")
        return self.net(torch.cat(parts, dim=1))

    def _labels(self, y: Tensor | None, b: int, device: torch.device) -> Tensor:
        assert self.num_classes is not None
        if y is None:
            return torch.full((b,), self.num_classes, dtype=torch.long, device=device)
        integer = torch.is_tensor(y) and not (
            y.is_floating_point() or y.is_complex() or y.dtype == torch.bool
        )
        if not integer:
            got = y.dtype if torch.is_tensor(y) else type(y).__name__
            raise TypeError(f"y must be an integer tensor of class labels; got {got}")
        if y.dim() == 0:
            y = y.expand(b)
        elif y.shape != (b,):
            raise ValueError(
                f"y must be 0-d or shaped (B,) = ({b},); got y of shape {tuple(y.shape)}"
            )
        if on_host(y) and y.numel():  # no value check on a device or under vmap / jacrev
            bad = (y < 0) | (y > self.num_classes)
            if bool(bad.any()):
                raise ValueError(
                    f"y must hold labels in 0..{self.num_classes - 1} or the null label "
                    f"{self.num_classes}; got values {y[bad].unique().tolist()}"
                )
        return y.long()
