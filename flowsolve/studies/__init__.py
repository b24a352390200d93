"""Solver studies: :func:`~flowsolve.studies.compare.compare_solvers` (error, sample quality,
wall time against NFE) and its ``Study`` records, tables and plots."""
