"""The device mesh (data, fsdp, tensor) and the one rules table from logical axes to mesh axes.

Model code names logical axes only; `RULES` maps each name to mesh axes, for training and serving
alike. Three kinds of array carry names:

- parameters, in their `out_sharding` metadata (see `attention.param`): `param_shardings`;
- activations at layer boundaries (the residual stream, the logits): `constrain`, which applies
  while a mesh is in context (`under_mesh`, `jax.set_mesh`) and does nothing otherwise;
- the decode cache, whose arrays are named by what they hold (`attention.KV`): `cache_shardings`.

A dimension that a mesh axis does not divide, or whose mesh axis is already used by another
dimension of the same array, is replicated instead.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lckv_jax.attention import KV

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (a tuple shards over their product), or None (replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    # Parameters.
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    # Activations: rows over the batch axes; the residual stream whole on each tensor shard (the
    # tensor-parallel matmuls reduce into it), the logits split by vocabulary like the LM head.
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_vocab": ("tensor",),
    # The decode cache [batch, slots, kv_heads, head_dim]: rows as the activations, heads as the
    # K/V projections that write them.
    "cache_batch": ("data", "fsdp"),
    "cache_slots": None,
    "cache_kv_heads": ("tensor",),
    "cache_head_dim": None,
}

# Logical axes of the activations that `model.Transformer` constrains.
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")  # h [batch, seq, embed]
LOGITS = ("activation_batch", "activation_length", "activation_vocab")  # [batch, seq, vocab]
# Logical axes of the arrays of one `attention.KV` cache entry.
CACHE_KV = ("cache_batch", "cache_slots", "cache_kv_heads", "cache_head_dim")  # k, v
CACHE_SLOTS = ("cache_batch", "cache_slots")  # pos, seg
CACHE_SCALES = ("cache_batch", "cache_kv_heads", "cache_slots")  # k_scale, v_scale (quantized)


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when multi-host environment variables are set.

  Reads JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID; on clusters
  that JAX detects itself (SLURM, Cloud TPU, ...) set LCKV_DISTRIBUTED=1 to call it bare.
  """
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    num, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=addr,
                               num_processes=int(num) if num else None,
                               process_id=int(pid) if pid else None)
    return True
  if os.environ.get("LCKV_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to the devices left over; errors name the shape and the count."""
  shape = [int(mesh_cfg[a]) for a in MESH_AXES]
  desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape ({desc}) is invalid: use positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape ({desc}) does not divide the {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape ({desc}) uses {math.prod(shape)} devices but there are "
                     f"{num_devices}; make the product equal the device count or set one axis to -1")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # non-TPU topologies the helper does not know: plain order
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(axes, shape, mesh: Mesh, rules=None) -> P:
  """A PartitionSpec for an array of `shape` with logical `axes`, following `rules`."""
  rules = RULES if rules is None else rules
  used, out = set(), []
  for name, dim in zip(axes, shape):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to sharding.RULES")
    mesh_axes = rules.get(name) if name is not None else None
    # Mesh axes the mesh lacks (a decode mesh of (data, tensor), say) count as size 1.
    mesh_axes = tuple(a for a in (mesh_axes or ()) if mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size or used & set(mesh_axes):
      out.append(None)
      continue
    used |= set(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*out)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules=None) -> dict:
  """Pure dict of NamedShardings for the Param state of a model (abstract or concrete)."""
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  shapes = nnx.to_pure_dict(abstract_params)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec), x.shape, mesh, rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are [micro_batches, batch, seq]: the batch axis over (data, fsdp)."""
  return NamedSharding(mesh, P(None, logical_to_spec(("activation_batch",), (0,), mesh)[0], None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cache_shardings(cache, mesh: Mesh, rules=None):
  """NamedShardings of a decode cache: the same tree, each `attention.KV` entry a KV of shardings.

  k, v [batch, slots, kv_heads, head_dim] follow `CACHE_KV`; pos, seg [batch, slots] `CACHE_SLOTS`;
  a quantized cache's k_scale, v_scale [batch, kv_heads, slots] `CACHE_SCALES`.
  `cache` may be a `cache.KVCache`, one KV, or any tree of them (abstract or concrete).
  """
  axes_of = (CACHE_KV, CACHE_KV, CACHE_SLOTS, CACHE_SLOTS, CACHE_SCALES, CACHE_SCALES)

  def entry(e: KV) -> KV:
    return KV(*(None if x is None else NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh,
                                                                            rules))
                for axes, x in zip(axes_of, e)))

  return jax.tree.map(entry, cache, is_leaf=lambda x: isinstance(x, KV))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], rules=None) -> jax.Array:
  """`x` constrained to the sharding of its `logical_axes` when a mesh is in context, else `x`.

  The mesh is the context's abstract mesh (`jax.sharding.get_abstract_mesh`), set by `under_mesh`
  or `jax.set_mesh`; without one, or on a mesh of one device, `x` traces exactly as without the
  call. `x`: any array whose dimensions `logical_axes` names, e.g. h [batch, seq, embed] with
  `RESIDUAL`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:  # one device: nothing to place
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))


def under_mesh(mesh: Mesh, fn):
  """`fn` run with `mesh` as the context's mesh, so that `constrain` inside it applies.

  For a function that `jax.jit` traces (`jax.set_mesh` may not be entered under jit; the abstract
  mesh may): `jax.jit(under_mesh(mesh, step), in_shardings=...)`.
  """
  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return run
