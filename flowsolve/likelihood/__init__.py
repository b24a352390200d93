"""Likelihoods: the divergence (exact or Hutchinson), the CNF log-likelihood by the
instantaneous change of variables, dequantisation and bits/dim, and batched, resumable,
sharded evaluation over a data set."""
