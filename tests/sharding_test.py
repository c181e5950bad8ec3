import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from lckv_jax import sharding
from tests import ROOT


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def test_mesh_shape_fills_and_checks():
  assert sharding.mesh_shape(_mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(_mesh_cfg(1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.mesh_shape(_mesh_cfg(-1, 3, 1), 8)
  with pytest.raises(ValueError, match="uses 4 devices but there are 8"):
    sharding.mesh_shape(_mesh_cfg(2, 2, 1), 8)


def test_logical_rules_one_table():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  assert sharding.logical_to_spec(("embed", "q_heads", "head_dim"), (8, 4, 4), mesh) == \
      P("fsdp", "tensor", None)
  assert sharding.logical_to_spec(("layers", "embed", "mlp"), (3, 8, 6), mesh) == \
      P(None, "fsdp", "tensor")
  # A dimension the axis does not divide is replicated.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (8, 1, 4), mesh) == \
      P("fsdp", None, None)
  assert sharding.logical_to_spec(("norm",), (8,), mesh) == P(None)


def test_constrain_applies_only_under_a_mesh():
  f = lambda x: sharding.constrain(x * 2, sharding.LOGITS)
  x = jax.numpy.ones((4, 3, 8))
  assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))
  # A mesh of one device places nothing either.
  one = jax.sharding.AbstractMesh((1, 1, 1), sharding.MESH_AXES)
  assert "sharding_constraint" not in str(jax.make_jaxpr(sharding.under_mesh(one, f))(x))
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  jaxpr = str(jax.make_jaxpr(sharding.under_mesh(mesh, f))(x))
  assert "sharding_constraint" in jaxpr and "spec=P(('data', 'fsdp'), None, 'tensor')" in jaxpr


def test_cache_shardings_name_the_cache_axes(tiny_config):
  from lckv_jax.cache import KVCache
  cfg = tiny_config(vocab_size=256, layer_types="lckv")
  cache = jax.eval_shape(lambda: KVCache.create(cfg, 4, 16))
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  got = sharding.cache_shardings(cache, mesh)
  assert isinstance(got, KVCache) and got.kv_layers == cache.kv_layers
  for e in got.layers.values():  # k, v [batch, slots, kv_heads, head_dim]; pos, seg [batch, slots]
    assert e.k.spec == e.v.spec == P(("data", "fsdp"), None, "tensor", None), e.k.spec
    assert e.pos.spec == e.seg.spec == P(("data", "fsdp"), None), e.pos.spec
  # The rules decide: a table that keeps heads whole replicates them.
  whole = dict(sharding.RULES, cache_kv_heads=None)
  e = next(iter(sharding.cache_shardings(cache, mesh, whole).layers.values()))
  assert e.k.spec == P(("data", "fsdp"), None, None, None), e.k.spec
  # A quantized cache's scales [batch, slots, kv_heads] follow its rows and heads.
  int8 = jax.eval_shape(lambda: KVCache.create(cfg, 4, 16, "int8"))
  for e in sharding.cache_shardings(int8, mesh).layers.values():
    assert e.k.spec == P(("data", "fsdp"), None, "tensor", None), e.k.spec
    assert e.k_scale.spec == e.v_scale.spec == P(("data", "fsdp"), "tensor", None), e.k_scale.spec


_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, chex, sys
    sys.path.insert(0, %r)
    assert jax.device_count() == 8, jax.devices()
    from tests.tiny import tiny_train_config
    from lckv_jax.train.trainer import Trainer
    results = {}
    # The activation constraints (sharding.constrain) of the residual stream [batch, seq, embed]
    # and the logits [batch, seq, vocab], as the traced train step holds them.
    residual = "spec=P(('data', 'fsdp'), None, None)"
    logits = "spec=P(('data', 'fsdp'), None, 'tensor')"
    for name, (d, f, t), devs in [("one", (1, 1, 1), jax.devices()[:1]),
                                  ("mesh", (2, 2, 2), jax.devices())]:
      c = tiny_train_config(grad_accum=2)
      c.mesh.update(data=d, fsdp=f, tensor=t)
      tr = Trainer(c, "/tmp/unused", devices=devs, write_metrics=False)
      state = tr.init_state()
      batch = tr.device_batch(tr.data.train[0])
      jaxpr = str(jax.make_jaxpr(tr.train_step)(state, batch))
      constraints = jaxpr.count("sharding_constraint[")
      if name == "one":
        assert constraints == 0, constraints
      else:  # each in the forward pass and, transposed, in the backward pass
        assert jaxpr.count(residual) >= 2 and jaxpr.count(logits) >= 2, constraints
        assert constraints == jaxpr.count(residual) + jaxpr.count(logits), constraints
        hlo = tr.train_step.lower(state, batch).as_text()
        assert "sharding_constraint" in hlo or "@Sharding" in hlo, "no constraint in the HLO"
      state, metrics = tr.train_step(state, batch)
      results[name] = (jax.device_get(state), jax.device_get(metrics))
      if name == "mesh":
        emb = state["params"]["embed"]
        assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), emb.sharding
        assert emb.addressable_shards[0].data.shape == (128, 16), emb.addressable_shards[0].data.shape
        q = state["params"]["blocks"][0]["layers"][0]["attn"]["q_proj"]
        assert q.addressable_shards[0].data.shape[1:] == (16, 2, 8), q.addressable_shards[0].data.shape
        mu = state["opt_state"][1][0].mu["embed"]
        assert mu.sharding.spec == emb.sharding.spec, mu.sharding
    (s1, m1), (s8, m8) = results["one"], results["mesh"]
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    chex.assert_trees_all_close(s1["params"], s8["params"], atol=1e-5, rtol=0)
    print("SHARDING_OK", float(m1["loss"]), float(m8["loss"]), constraints)
""")


def test_train_step_on_8_devices_matches_1_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _SCRIPT % ROOT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "SHARDING_OK" in out.stdout, out.stderr[-3000:]


_RESHARD_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, chex, sys
    sys.path.insert(0, %r)
    from tests.tiny import tiny_train_config
    from lckv_jax.train import checkpointing
    from lckv_jax.train.trainer import Trainer
    workdir = sys.argv[1]

    def trainer(mesh, devices):
      c = tiny_train_config()
      c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
      return Trainer(c, workdir, devices=devices, write_metrics=False)

    # Written on 8 devices as (2 data, 2 fsdp, 2 tensor); values random (no compile needed).
    src = trainer((2, 2, 2), jax.devices())
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda x: (rng.standard_normal(x.shape) if x.dtype.kind == "f" else
                                   rng.integers(0, 100, x.shape)).astype(x.dtype),
                        src.abstract_state)
    state = jax.tree.map(lambda v, x: jax.device_put(v, x.sharding), host, src.abstract_state)
    assert state["params"]["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ckpt = checkpointing.Checkpointer(workdir)
    ckpt.save(3, state, {"step": 3}, src.config.to_json())
    ckpt.close()
    # Restored by the trainer's resume path onto 1 device and onto (4 data, 1 fsdp, 2 tensor).
    for mesh, devices in [((1, 1, 1), jax.devices()[:1]), ((4, 1, 2), jax.devices())]:
      dst = trainer(mesh, devices)
      got, history = dst.train(max_steps=3)  # resumes at step 3: nothing left to run
      assert history == [], history
      jax.tree.map(lambda x, s: None if x.sharding.is_equivalent_to(s, x.ndim) else
                   sys.exit(f"{mesh}: sharding {x.sharding} != {s}"), got, dst.state_shardings)
      chex.assert_trees_all_equal(jax.device_get(got), host)
      print("RESTORED", mesh, got["params"]["embed"].sharding.spec)
    print("RESHARD_OK")
""")


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT % ROOT, str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "RESHARD_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
