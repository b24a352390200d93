"""The bottom layer, used by every other: the ``Field`` type, the errors a solve ends in and
its one finiteness check, argument checks, NFE counting, atomic file writes, and the solver
registry (:class:`~flowsolve._core.registry.SolverInfo`: declared facts, helpful lookups)."""
