import os
import re
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from lckv_jax import cli
from lckv_jax import sharding
from lckv_jax.train import memory, step as step_lib
from lckv_jax.train.config import default_config, from_file, model_config, resolve_grad_accum
from lckv_jax.train.trainer import Trainer
from tests.conftest import xla_optimizations
from tests import ROOT


def _random_config(rng):
  """A small model of drawn shapes (some not divisible by the mesh: replicated dimensions)."""
  c = default_config()
  heads = int(rng.choice([2, 4, 8]))
  kv_heads = int(rng.choice([k for k in (1, 2, 4) if heads % k == 0]))
  c.model.update(vocab_size=int(rng.choice([256, 300, 512])),
                 hidden_size=heads * int(rng.choice([8, 12, 16])),
                 intermediate_size=int(rng.choice([48, 64, 100])),
                 num_layers=int(rng.integers(2, 7)), num_heads=heads, num_kv_heads=kv_heads,
                 layer_types=str(rng.choice(["llama", "lckv", "cla"])),
                 tie_word_embeddings=bool(rng.integers(2)), max_position_embeddings=64)
  c.update(seq_len=32, batch_size=16)
  return c


def _spec_bytes(x, spec, mesh) -> int:
  """Bytes of one shard of `x` from its PartitionSpec alone: the size over each sharded axis."""
  parts = 1
  for axes in spec:
    for a in (axes,) if isinstance(axes, str) else axes or ():
      parts *= mesh.shape[a]
  return x.size * x.dtype.itemsize // parts


@pytest.mark.parametrize("seed", range(4))
def test_params_and_optimizer_state_are_the_exact_shard_bytes(seed):
  rng = np.random.default_rng(seed)
  c = _random_config(rng)
  mc = model_config(c)
  shapes = [(1, 4, 2), (2, 2, 2), (1, 8, 1), (2, 1, 4)]
  mesh = AbstractMesh(shapes[int(rng.integers(len(shapes)))], sharding.MESH_AXES)
  est = memory.estimate(c, mc, mesh, grad_accum=2)
  # Expected from the logical axes and the rules, not from shard_shape.
  state = nnx.state(step_lib.abstract_model(mc), nnx.Param)
  logical = jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(state)),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(nnx.to_pure_dict(state))
  params = sum(_spec_bytes(x, sharding.logical_to_spec(tuple(axes), x.shape, mesh), mesh)
               for axes, x in zip(logical, leaves))
  full = sum(x.size * x.dtype.itemsize for x in leaves)
  assert est.params == params and params < full  # something is sharded on every drawn mesh
  # AdamW keeps mu and nu shaped and sharded like the parameters, plus two int32 step counts.
  assert est.opt_state == 2 * params + 2 * 4
  assert est.grads == 2 * params  # accumulator + one micro-batch's gradients
  assert est.rows == c.batch_size // 2 // (mesh.shape["data"] * mesh.shape["fsdp"])
  assert est.total == est.params + est.opt_state + est.grads + est.activations


def test_the_trainer_estimates_its_own_state(tmp_path, tiny_train_config):
  tr = Trainer(tiny_train_config(), str(tmp_path), write_metrics=False)
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tr.abstract_state["params"]))
  assert tr.memory.params == params and tr.memory.grads == params  # one device, one micro-batch
  assert tr.memory.rows == tr.config.batch_size and tr.memory.activations > 0
  assert re.fullmatch(r"[\d.,]+ GB per device \(parameters [\d.]+ GB, optimizer state .* "
                      r"for 8 rows x 32 tokens, remat=none\)", tr.memory.describe())


# Calibrated on a CPU (docs/training.md): over configs of configs/tiny.py the estimate was
# 0.75-0.97 of XLA's count, never above. The band leaves room for other XLA versions.
_BAND = (0.7, 1.0)


@pytest.mark.parametrize("changes", [
    {},  # the tiny LCKV model: runs of one block, no remat
    {"model.layer_types": "llama", "model.remat": "full"},  # a scanned stack, rematerialised
    {"model.layer_types": "llama", "model.remat": "dots", "batch_size": 16, "grad_accum": 2},
])
def test_the_estimate_is_close_to_and_below_xla(tmp_path, changes):
  c = from_file(os.path.join(ROOT, "configs", "tiny.py"))
  c.data.update(max_documents=30, eval_batches=1)
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  tr = Trainer(c, str(tmp_path), write_metrics=False)
  with xla_optimizations():  # the suite compiles without them; a real run has them
    ma = tr._compile_step().memory_analysis()
  need = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)
  est = tr.memory
  assert _BAND[0] <= (est.grads + est.activations) / ma.temp_size_in_bytes <= _BAND[1], (
      est, ma.temp_size_in_bytes)
  assert _BAND[0] <= est.total / need <= _BAND[1], (est, need)


def _tiny_32(tmp_path, **changes):
  c = from_file(os.path.join(ROOT, "configs", "tiny.py"))
  c.data.update(max_documents=30, eval_batches=1)
  c.update(batch_size=32, progress_bar=False, **changes)
  return c


def test_check_refuses_what_cannot_fit_and_its_suggestion_fits(tmp_path, monkeypatch):
  budget = 150_000_000
  monkeypatch.setattr(memory, "device_memory", lambda device: (budget, "a test budget"))
  tr = Trainer(_tiny_32(tmp_path), str(tmp_path / "wd"), write_metrics=False)
  assert tr.memory.total > budget  # 32 rows of 128 tokens need ~0.4 GB
  with pytest.raises(cli.UserError) as e:
    tr.train(max_steps=1)
  message = str(e.value)
  assert "\n" not in message
  assert f"needs an estimated {tr.memory.describe()}" in message
  assert "more than the device's 0.150 GB (a test budget)" in message
  assert "config.batch_size=32 in 1 micro-batch(es)" in message
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")  # refused before anything was made
  rows = int(re.search(r"--config\.grad_accum=0 --config\.micro_batch_per_device=(\d+) ",
                       message).group(1))
  assert rows < 32
  fixed = Trainer(_tiny_32(tmp_path, grad_accum=0, micro_batch_per_device=rows),
                  str(tmp_path / "wd2"), write_metrics=False)
  assert fixed.memory.rows <= rows and fixed.memory.total <= budget
  memory.check(fixed.memory, budget, "a test budget", fixed.config, fixed.model_config,
               fixed.mesh)  # passes
  if "--config.model.remat=full (" in message:
    full = _tiny_32(tmp_path)
    full.model.remat = "full"
    assert Trainer(full, str(tmp_path / "wd3"), write_metrics=False).memory.total <= budget


def test_when_the_state_alone_does_not_fit_it_says_so_and_suggests_fsdp(tiny_train_config):
  c = tiny_train_config()
  mc = model_config(c)
  mesh = AbstractMesh((8, 1, 1), sharding.MESH_AXES)
  est = memory.estimate(c, mc, mesh, resolve_grad_accum(c, 8))
  with pytest.raises(cli.UserError, match=r"the parameters, optimizer state and gradients alone "
                     r"need .* over the 8 devices with --config\.mesh\.fsdp=8"):
    memory.check(est, est.params * 3, "a test budget", c, mc, mesh)
  one = AbstractMesh((1, 1, 1), sharding.MESH_AXES)
  est = memory.estimate(c, mc, one, 1)
  with pytest.raises(cli.UserError, match="use more devices .* or a smaller model"):
    memory.check(est, est.params, "a test budget", c, mc, one)


def test_check_compiled_reads_xla_and_refuses_before_the_first_step(tmp_path, tiny_train_config):
  rng = np.random.default_rng(0)
  tr = Trainer(tiny_train_config(), str(tmp_path), write_metrics=False)
  sizes = dict(zip(("argument", "output", "alias", "temp"), rng.integers(10**6, 10**8, 4)))
  sizes["alias"] = min(sizes["alias"], sizes["output"])
  need = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  compiled = types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
      **{f"{k}_size_in_bytes": int(v) for k, v in sizes.items()}))
  args = (tr.memory, tr.config, tr.model_config, tr.mesh)
  memory.check_compiled(compiled, int(need), "a test budget", *args)  # exactly fits
  with pytest.raises(cli.UserError, match=rf"compiled train step .* needs {need / 1e9:.3f} GB "
                     r"per device \(arguments .* more than the device's"):
    memory.check_compiled(compiled, int(need) - 1, "a test budget", *args)
  # Backends that cannot say are not refused.
  memory.check_compiled(types.SimpleNamespace(memory_analysis=lambda: None), 1, "x", *args)
  memory.check_compiled(compiled, None, "unknown", *args)


def test_device_memory_names_its_source():
  got, what = memory.device_memory(jax.local_devices(backend="cpu")[0])
  n = len(jax.local_devices(backend="cpu"))
  assert what.startswith(f"available host RAM / {n} CPU device") and 0 < got
  gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 80 * 10**9})
  assert memory.device_memory(gpu) == (80 * 10**9, "GPU allocator limit")
  tpu = types.SimpleNamespace(platform="tpu", memory_stats=lambda: None)
  assert memory.device_memory(tpu)[0] is None


def test_the_1b_config_is_refused_on_this_cpu_in_seconds_without_compiling(tmp_path):
  c = from_file(os.path.join(ROOT, "configs", "1b.py"))
  mesh = sharding.make_mesh(c.mesh, jax.local_devices(backend="cpu")[:1])
  est = memory.estimate(c, model_config(c), mesh, resolve_grad_accum(c, 1), backend="cpu")
  available, _ = memory.device_memory(jax.local_devices(backend="cpu")[0])
  if available is None or est.total <= available:
    pytest.skip(f"this host has {available} bytes: configs/1b.py would fit")
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "train.py", "--config=configs/1b.py",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  took = time.perf_counter() - start
  assert out.returncode == cli.EXIT_USER_ERROR, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("train.py: error: the train step"), lines
  assert re.search(r"needs an estimated [\d,.]+ GB per device \(.*\), more than the device's "
                   r"[\d,.]+ GB \(available host RAM / 1 CPU device\)", lines[0]), lines[0]
  assert took < 30, took
  assert not os.path.exists(tmp_path / "checkpoints")  # refused before the state or a compile
