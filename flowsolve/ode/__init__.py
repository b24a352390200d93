"""ODE solving: the front door :func:`~flowsolve.ode.solve.sample`, its argument checks and
time grids, the back ends (torchdiffeq, scipy, flowsolve's own fixed-step loop with its
Runge-Kutta tableaus) and the systems they integrate."""
