"""Attention kernels, one module per kernel, and the dispatch that picks one for each call.

- `dispatch`: the typed plan of an attention call and the table from plan to kernel.
- `reference`: the dense mask and softmax in XLA; runs any call, and every test's oracle.
- `fused`: `jax.nn.dot_product_attention` (cuDNN on a GPU, or XLA's) for chunks over their own keys.
- `tpu`: splash attention (Pallas, Mosaic TPU) for unpacked and packed chunks on TPU.
- `decode`: a Pallas (Triton) decode-step attention for GPUs that reads only each row's valid
  cache prefix.
"""
