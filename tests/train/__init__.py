"""Tests of lckv_jax/train/."""
