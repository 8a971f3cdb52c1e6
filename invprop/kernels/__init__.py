"""Fused device kernels (Triton) with pure-torch equivalents of the same contract."""
