r"""A small U-Net for 8x8 images, following the field convention ``model(x, t, y=None)``.

Architecture (channels ``C``, embedding width ``E``)::

    x (B, c, H, W) -> conv3x3 -> Res(C, C) ---------------------------- skip1
                     -> conv3x3 stride 2 (H/2 x W/2) -> Res(C, 2C) ---- skip2
                     -> Res(2C, 2C)                                    (middle)
                     -> concat skip2 -> Res(4C, 2C)
                     -> nearest upsample x2 -> conv3x3 (2C -> C)
                     -> concat skip1 -> Res(2C, C)
                     -> GroupNorm -> SiLU -> conv3x3 -> (B, c, H, W)

Every residual block is ``h = conv(SiLU(GN(x))) + W SiLU(e)``, ``out = skip(x) +
conv(SiLU(GN(h)))``: the conditioning vector ``e = MLP(sin/cos(t)) + E_label(y)`` goes
through a SiLU and is projected to a per-channel bias, added once per block (as in DDPM's
U-Net, Ho et al. 2020, without attention at this size). The label table has
``num_classes + 1`` rows; index ``num_classes`` (= :attr:`null_label`) is the "no label"
class of classifier-free guidance and ``y=None`` means it.

With the defaults (``C = 24``, ``E = 96``) the network has 216,481 parameters (2.2e5;
96,961 = 1.0e5 with ``C = 16``, ``E = 64``), conditional on 10 classes.
The forward pass checks shapes only (and the label range on CPU tensors outside
``torch.func`` transforms), so it runs inside solver loops and ``torch.func`` transforms
(also over the labels) without host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._core.checks import on_host
from .nets import SinusoidalTimeEmbedding, initial_weights_from, positive_int

__all__ = ["UNet"]


def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(self.act(e))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    r"""A two-level U-Net for small images: ``f(x, t, y) -> (B, c, H, W)``.

    Args:
        in_channels: image channels ``c`` (1 for the digits).
        channels: width ``C`` of the first level (the second has ``2C``).
        embedding_dim: width ``E`` of the time / label conditioning vector.
        num_classes: number of labels of a conditional model, ``None`` for none.
        groups: GroupNorm groups (at most; reduced to a divisor of the channels).
        max_frequency: highest frequency of the sinusoidal time embedding. The default
            1000 (the DDPM / transformer value) is kept because the documented digits
            results were trained with it; :class:`flowsolve.training.nets.MLP` defaults to 30
            because with 1000 a trained 2-D model's fixed-step ODE errors stalled near 1e-2
            and euler / midpoint / rk4 fell short of their orders (the field varies on time
            scales of ``1 / max_frequency``). A smaller value (e.g. 30) makes the field
            smoother in ``t`` and fixed-step solvers more accurate per step, at the cost of
            a coarser code of ``t``; the weights do not depend on it (same parameter count
            and initial draws), but a trained model must be rebuilt with its own value.
        generator: draws the initial weights (:func:`flowsolve.training.nets.initial_weights_from`);
            ``None``: torch's global RNG.

    Shapes: ``x`` ``(B, c, H, W)`` with even ``H``, ``W`` (8x8 for the digits); ``t`` 0-d
    or ``(B,)``; ``y`` ``None``, 0-d or ``(B,)`` integer labels in ``0..num_classes``.

    Example:
        >>> net = UNet(num_classes=10)
        >>> net(torch.zeros(3, 1, 8, 8), torch.tensor(0.5), y=torch.tensor([0, 4, 10])).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 24,
        embedding_dim: int = 96,
        num_classes: int | None = None,
        groups: int = 8,
        generator: torch.Generator | None = None,
        max_frequency: float = 1000.0,
    ):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        c = positive_int(channels, "channels")
        e = positive_int(embedding_dim, "embedding_dim", 2)
        positive_int(groups, "groups")
        if num_classes is not None:
            positive_int(num_classes, "num_classes")
        self.num_classes = num_classes
        with initial_weights_from(generator):
            freq = c + c % 2  # sin/cos pairs
            self.time_embedding = nn.Sequential(
                SinusoidalTimeEmbedding(freq, max_frequency), nn.Linear(freq, e), nn.SiLU(),
                nn.Linear(e, e),
            )
            self.label_embedding: nn.Embedding | None = None
            if num_classes is not None:
                self.label_embedding = nn.Embedding(num_classes + 1, e)
            self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
            self.enc1 = _ResBlock(c, c, e, groups)
            self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
            self.enc2 = _ResBlock(c, 2 * c, e, groups)
            self.mid = _ResBlock(2 * c, 2 * c, e, groups)
            self.dec2 = _ResBlock(4 * c, 2 * c, e, groups)
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                    nn.Conv2d(2 * c, c, 3, padding=1))
            self.dec1 = _ResBlock(2 * c, c, e, groups)
            self.out = nn.Sequential(nn.GroupNorm(_groups(c, groups), c), nn.SiLU(),
                                     nn.Conv2d(c, in_channels, 3, padding=1))

    @property
    def null_label(self) -> int | None:
        """The label index that means "unconditional": ``num_classes`` (None if unconditional)."""
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x must be shaped (B, {self.in_channels}, H, W) with even H and "
                             f"W; got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        elif t.shape != (b,):
            raise ValueError(f"t must be 0-d or shaped (B,) = ({b},) to match x "
                             f"{tuple(x.shape)}; got t of shape {tuple(t.shape)}")
        e = self.time_embedding(t)
        if self.label_embedding is not None:
            e = e + self.label_embedding(self._labels(y, b, x.device))
        elif y is not None:
            raise ValueError("y was given but this UNet is unconditional (num_classes=None)")
        h1 = self.enc1(self.conv_in(x), e)
        h2 = self.enc2(self.down(h1), e)
        h = self.mid(h2, e)
        h = self.dec2(torch.cat([h, h2], 1), e)
        h = self.dec1(torch.cat([self.up(h), h1], 1), e)
        return self.out(h)

    def _labels(self, y: Tensor | None, b: int, device: torch.device) -> Tensor:
        assert self.num_classes is not None
        if y is None:
            return torch.full((b,), self.num_classes, dtype=torch.long, device=device)
        if not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() or \
                y.dtype == torch.bool:
            got = y.dtype if torch.is_tensor(y) else type(y).__name__
            raise TypeError(f"y must be an integer tensor of class labels; got {got}")
        if y.dim() == 0:
            y = y.expand(b)
        elif y.shape != (b,):
            raise ValueError(f"y must be 0-d or shaped (B,) = ({b},); got {tuple(y.shape)}")
        if on_host(y) and y.numel():  # no value check on a device or under vmap / jacrev
            bad = (y < 0) | (y > self.num_classes)
            if bool(bad.any()):
                raise ValueError(f"y must hold labels in 0..{self.num_classes - 1} or the null "
                                 f"label {self.num_classes}; got values {y[bad].unique().tolist()}")
        return y.long()
