"""Closed-form ground truth: Gaussian-mixture data with exact ``p_t``, marginal velocity,
score and posterior mean on any affine path (``flowsolve.analytic`` is its module)."""
