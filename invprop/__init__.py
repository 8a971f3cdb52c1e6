"""invprop: Invariance Propagation self-supervised training."""
