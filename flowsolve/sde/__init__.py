"""SDE solving over torchsde's steppers: the marginal-preserving SDE and Langevin dynamics
(:func:`~flowsolve.sde.solve.sample_sde`), Brownian motion on the solver's grid, and the
diffusion coefficients ``g_t``."""
