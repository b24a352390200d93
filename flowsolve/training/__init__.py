"""Training: flow-matching and score-matching losses, minibatch couplings (POT), toy data and
the batch pipeline, networks (MLP, small U-Net), EMA, the training loop and its
checkpoints."""
