"""Triton kernels of igds_fast (import name `igds_fast.kernels`)."""
