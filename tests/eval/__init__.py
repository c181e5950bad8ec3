"""Tests of lckv_jax/eval/."""
