"""Tests of lckv_jax/data/."""
