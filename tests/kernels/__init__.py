"""Tests of lckv_jax/kernels/."""
