"""FLOPs per token, with the extra passes of the cyclic group."""

import pytest

from lckv_jax.train.config import model_config


def test_flops_count_the_extra_passes_of_the_cyclic_group(tiny_train_config):
  from lckv_jax import flops
  base = model_config(tiny_train_config())
  llama = base.replace(layer_types="llama")
  lckv = base.replace(layer_types="3_3_3_3", forward_passes=7, backward_passes=2)
  # Every layer of an all-cyclic stack costs 3b + m = 13 forward passes instead of 3 (the KV
  # weights of layers 0..2 are gone, so compare per-layer costs at equal layer weights).
  per_layer = lambda cfg, i: 2 * flops.layer_matmul_params(cfg, i) + 4 * 32 * 4 * 8
  head = 3 * 2 * base.hidden_size * base.vocab_size
  assert flops.flops_per_token(llama, 32) == pytest.approx(
      3 * sum(per_layer(llama, i) for i in range(4)) + head)
  assert flops.flops_per_token(lckv, 32) == pytest.approx(
      13 * sum(per_layer(lckv, i) for i in range(4)) + head)
