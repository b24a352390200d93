"""Probability paths: schedulers (``alpha_t``, ``sigma_t``), the affine Gaussian path
``x_t = alpha_t x1 + sigma_t x0`` and its conversions between predictions, field adapters
(conversion, classifier-free guidance, probability flow), scheduler transfer, and Gaussian
bridges between arbitrary pairs."""
