"""Fused attention kernels behind `lckv_jax.attention`, one module per backend.

- `decode`: a Pallas (Triton) decode-step attention for GPUs that reads only each row's valid
  cache prefix.
- `tpu`: splash attention (Pallas, Mosaic TPU) for unpacked and packed chunks on TPU.

The XLA path in `lckv_jax.attention` is the portable fallback and the reference of every test.
"""
