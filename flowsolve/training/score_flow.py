r"""Simulation-free score and flow matching ([SF]2M; Tong et al., AISTATS 2024) on a
:class:`~flowsolve.paths.bridges.GaussianBridge`: a velocity and a score learned together,
so that the learned bridge can be sampled as the SDE it is, not only as its ODE.

On the bridge ``x_t = (1 - t) x0 + t x1 + sigma_t eps`` between coupled pairs the
conditional velocity is ``dx_t = x1 - x0 + sigma'_t eps`` and the conditional score
``grad log p_t(x_t | x0, x1) = -eps / sigma_t``. The loss of one pair is

    l = (1/D) ||v_theta(x_t, t) - dx_t||^2 + (1/D) ||sigma_t s_theta(x_t, t) + eps||^2,

the flow-matching regression plus the score regression weighted by ``lambda_t^2 =
sigma_t^2`` ([SF]2M's weighting: their network outputs ``(g^2/2) s`` with ``lambda_t = 2
sigma_t / g^2``, the same loss). Its minimisers are the marginal velocity ``v_t`` of the
bridge mixture (the probability-flow ODE of its marginals) and the marginal score ``s_t =
grad log p_t``. With the Brownian bridge of noise ``g`` (``sigma_t = g sqrt(t (1 - t))``)
and entropic-OT pairs at ``reg = 2 g^2``, the marginals are those of the Schrodinger bridge,
and the bridge itself is the SDE

    dX = [v_t(X) + (g^2 / 2) s_t(X)] dt + g dW,

which :func:`flowsolve.sde.solve.sample_sde` integrates as ``sample_sde(model, x0,
score=model.score, diffusion=g)``; ``sample(model, x0)`` integrates its ODE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._core.checks import generator_or_fresh, per_sample
from ..paths.bridges import GaussianBridge
from .losses import check_model_and_samples, check_reduction, clamp_bridge_time, sample_time

__all__ = ["FlowAndScore", "score_flow_matching_loss"]


class FlowAndScore(nn.Module):
    """A velocity network and a score network trained together (``[SF]2M``).

    ``model(x, t)`` is the velocity (a field for :func:`~flowsolve.ode.solve.sample` and the
    likelihoods), ``model.score(x, t)`` the score (``score=`` of
    :func:`~flowsolve.sde.solve.sample_sde`), and ``model(x, t, with_score=True)`` both in
    one call (what the loss calls, so that a ``DistributedDataParallel`` wrapper sees every
    parameter used). Labels ``y`` go to both networks when given.

    >>> import torch
    >>> from flowsolve.training.nets import MLP
    >>> m = FlowAndScore(MLP(2, hidden=8, depth=1), MLP(2, hidden=8, depth=1))
    >>> v, s = m(torch.zeros(3, 2), torch.tensor(0.5), with_score=True)
    >>> v.shape, s.shape
    (torch.Size([3, 2]), torch.Size([3, 2]))
    """

    def __init__(self, flow: nn.Module, score: nn.Module):
        super().__init__()
        for name, net in (("flow", flow), ("score", score)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be an nn.Module (x, t) -> Tensor; got "
                                f"{type(net).__name__}")
        self.flow, self.score = flow, score
        self.num_classes = getattr(flow, "num_classes", None)
        self.null_label = getattr(flow, "null_label", None)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, *,
                with_score: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        kwargs = {} if y is None else {"y": y}
        v = self.flow(x, t, **kwargs)
        return (v, self.score(x, t, **kwargs)) if with_score else v


def score_flow_matching_loss(
    model: FlowAndScore | Any,
    bridge: GaussianBridge,
    x0: Tensor,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""``l_i = (1/D) ||v(x_t, t) - dx_t||^2 + (1/D) ||sigma_t s(x_t, t) + eps||^2`` on a
    bridge with noise (``sigma > 0``).

    ``model(x_t, t, with_score=True, **model_kwargs)`` returns ``(v, s)`` shaped like ``x1``
    (a :class:`FlowAndScore`, or its ``DistributedDataParallel`` wrapper). ``t`` is drawn
    in (0, 1) (clamped to ``[1e-5, 1 - 1e-5]`` for the Brownian bridge) when omitted, and
    ``t`` and ``eps`` come from ``generator`` (None: a fresh unseeded generator; torch's
    global RNG is never used). ``reduction``: ``"mean"`` or ``"none"`` (``(B,)``).
    """
    check_reduction(reduction)
    if not isinstance(bridge, GaussianBridge):
        raise TypeError(f"bridge must be a flowsolve.paths.bridges.GaussianBridge; got "
                        f"{type(bridge).__name__}")
    if bridge.sigma == 0:
        raise ValueError("score and flow matching needs a bridge with noise (sigma > 0): at "
                         "sigma = 0 the bridge has no density and no score; use "
                         "bridge_matching_loss for the velocity alone")
    check_model_and_samples(model, x0, x1, x0_optional=False)
    generator = generator_or_fresh(generator, x1.device)
    if t is None:
        t = clamp_bridge_time(bridge, sample_time(x1.shape[0], generator=generator,
                                                  dtype=x1.dtype, device=x1.device))
    eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype,
                      device=generator.device).to(x1.device)
    s = bridge.sample(x0, x1, t, noise=eps)
    try:
        out = model(s.x_t, s.t, with_score=True, **model_kwargs)
    except TypeError as err:
        if "with_score" not in str(err):
            raise
        raise TypeError(f"model(x, t, with_score=True) must return (velocity, score); "
                        f"{type(model).__name__} takes no with_score (wrap the two networks "
                        "in flowsolve FlowAndScore(flow, score))") from err
    if not (isinstance(out, tuple) and len(out) == 2
            and all(torch.is_tensor(o) and o.shape == x1.shape for o in out)):
        raise ValueError(f"model(x, t, with_score=True) must return (velocity, score), each "
                         f"shaped like x {tuple(x1.shape)} (a flowsolve FlowAndScore)")
    v, score = out
    sigma_t, _ = bridge.sigma_t(s.t)
    flow_term = (v - s.dx_t).pow(2).reshape(x1.shape[0], -1).mean(1)
    score_term = (per_sample(sigma_t, x1) * score + eps).pow(2).reshape(x1.shape[0], -1).mean(1)
    loss = flow_term + score_term
    return loss.mean() if reduction == "mean" else loss
