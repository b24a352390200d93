"""Input validation, broadcasting and generator helpers shared by the public modules
(private).

Checks that need the value of a tensor (a range test) are done only where they cost no
host synchronisation: on CPU tensors. On an accelerator they are skipped, so that a
check never stalls a solver's step loop.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def generator_or_fresh(
    generator: torch.Generator | None, device: torch.device | str | None = None
) -> torch.Generator:
    """``generator`` itself, or when it is None a fresh generator on ``device`` (torch's
    default device when None) seeded nondeterministically (``Generator.seed()``), so that
    torch's global RNG is never read nor advanced (randomness comes in through arguments,
    never global state)."""
    if generator is not None:
        return check_generator(generator)
    if device is None:  # torch.get_default_device() needs torch 2.3
        device = torch.empty(0).device
    gen = torch.Generator(device=torch.device(device))
    gen.seed()
    return gen


def check_generator(generator, name: str = "generator"):
    """``generator`` if it is a ``torch.Generator`` or None; TypeError naming what it was (an
    int seed is the common slip: ``torch.Generator().manual_seed(seed)`` makes one)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    hint = (f"; for a seed use torch.Generator().manual_seed({generator!r})"
            if isinstance(generator, int) and not isinstance(generator, bool) else "")
    raise TypeError(f"{name} must be a torch.Generator or None; got "
                    f"{type(generator).__name__}{hint}")


def on_host(t: Tensor) -> bool:
    """A CPU tensor whose values can be read: not inside a torch.func transform (vmap,
    jacrev), where reading a value is impossible."""
    if t.device.type != "cpu":
        return False
    functorch = getattr(torch._C, "_functorch", None)
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return not (wrapped is not None and wrapped(t))


def check_unit_interval(t: Tensor, name: str = "t") -> None:
    """Raise ValueError if any entry of ``t`` lies outside [0, 1] (CPU tensors only)."""
    if on_host(t) and t.numel() > 0:
        bad = (t < 0) | (t > 1) | torch.isnan(t)
        if bool(bad.any()):
            value = t[bad].flatten()[0].item()
            raise ValueError(
                f"{name} must lie in [0, 1] (0 = source/noise, 1 = data); got {value!r}"
            )


def as_time(t: Tensor | float, x: Tensor, name: str = "t") -> Tensor:
    """Return ``t`` as a tensor on ``x``'s device and dtype, 0-d or ``(B,)``.

    Accepts a Python number, a 0-d tensor, a ``(B,)`` tensor or a ``(B, 1, ...)`` tensor
    (trailing singleton dims are dropped). Anything else raises a ValueError naming the
    shapes.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must be shaped (B, *event_shape); got a 0-d tensor")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    t = torch.as_tensor(t, device=x.device, dtype=dtype)
    if t.dim() > 1 and all(s == 1 for s in t.shape[1:]):
        t = t.reshape(t.shape[0])
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, x.shape[0])):
        raise ValueError(
            f"{name} must be a scalar or shaped (B,) = ({x.shape[0]},) to match x of shape "
            f"{tuple(x.shape)}; got {name} of shape {tuple(t.shape)}"
        )
    if t.dim() == 1 and t.shape[0] == 1 and x.shape[0] != 1:
        t = t.reshape(())
    check_unit_interval(t, name)
    return t


def per_sample(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a 0-d or ``(B,)`` coefficient so that it broadcasts against ``x`` (B, ...)."""
    if c.dim() == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


def first_singular_time(t: Tensor, *coefficients: Tensor) -> float | None:
    """The first time at which any coefficient is inf or NaN, or None (reads the device)."""
    bad = torch.zeros_like(coefficients[0], dtype=torch.bool)
    for c in coefficients:
        bad = bad | ~torch.isfinite(c)
    if not bool(bad.any()):
        return None
    return t.expand_as(bad)[bad].flatten()[0].item()


def check_finite_coefficients(
    t: Tensor, what: str, scheduler: object, **coefficients: Tensor
) -> None:
    """Raise ValueError naming the first ``t`` at which a schedule coefficient that ``what``
    needs is inf or NaN (e.g. ``alpha'_0 = inf`` of PolynomialScheduler(n < 1)), rather than
    let it turn into inf or NaN silently. CPU tensors only: it reads their values, which on
    an accelerator would synchronise with the device."""
    if not on_host(t):
        return
    for name, c in coefficients.items():
        if on_host(c) and c.numel() > 0 and not bool(torch.isfinite(c).all()):
            where = first_singular_time(t, c)
            value = c[~torch.isfinite(c)].flatten()[0].item()
            raise ValueError(
                f"{what} is singular at t={where!r} for {scheduler!r}: it needs {name}, "
                f"which is {value!r} there; restrict t to an interval [eps, 1 - eps]"
            )


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {name_a} {tuple(a.shape)} "
            f"and {name_b} {tuple(b.shape)}"
        )


def check_span(t0, t1) -> tuple[float, float]:
    """Distinct ``t0``, ``t1`` in [0, 1] as floats (``t0 > t1``: backwards)."""
    for name, v in (("t0", t0), ("t1", t1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a number in [0, 1]; got {type(v).__name__}")
    t0, t1 = float(t0), float(t1)
    if not (0.0 <= t0 <= 1.0 and 0.0 <= t1 <= 1.0) or t0 == t1:
        raise ValueError(f"t0 and t1 must be distinct times in [0, 1] (0 = noise, 1 = data; "
                         f"t0 > t1 integrates backwards); got t0={t0!r}, t1={t1!r}")
    return t0, t1
