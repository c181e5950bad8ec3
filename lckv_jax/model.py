"""The Llama decoder with cross-layer KV sharing, in Flax NNX (docs/spec.md §1-§5).

One pass of the layer stack is `_run_segment`; the iteration plan (`_cyclic_group`) repeats the
passes of a cyclic group; the entry points are thin drivers of the forward modes
(`lckv_jax.mode.Mode`):

- `Transformer.__call__`: `Mode.TRAIN`, the parallel mode (training, scoring), following the
  iteration plan.
- `Transformer.step`: a chunk of tokens against a `KVCache` (`PREFILL_EMPTY`, `PREFILL`); a
  single token (`DECODE`) runs one exact pass.
- `Transformer.sequential`: token by token through `step`, the exact model (the test oracle).

Parameters of runs of identical layers are stacked along a leading `layers` axis and scanned
(`config.scan_layers`); see `layer_types.scan_runs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lckv_jax import cache as cache_lib, layer_types as lt_lib, sharding
from lckv_jax.attention import KV, Attention, param, rope_inv_freq, rope_tables
from lckv_jax.config import ModelConfig
from lckv_jax.kernels import dispatch
from lckv_jax.kernels.reference import make_mask
from lckv_jax.mode import Mode

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


# -- input checks ----------------------------------------------------------------------------------


def _concrete(x) -> bool:
  """Whether `x` holds values, not a jit / grad / vmap tracer: checks of values then run."""
  return x is not None and not isinstance(x, jax.core.Tracer)


def check_inputs(config: ModelConfig, tokens, positions=None, segment_ids=None, *,
                 from_zero: bool = True) -> None:
  """Raises ValueError for a token id outside the vocabulary or a position past
  `max_position_embeddings`, where JAX's gather would clamp or wrap the id without a word.

  The length of a sequence with implicit positions 0..T-1 (`from_zero`) is checked statically,
  under jit too; ids and explicit positions only when concrete (traced ones give NaN logits
  instead, `_nan_rows`). Padding (segment id 0) is not checked.
  """
  vocab, limit = config.vocab_size, config.max_position_embeddings
  if positions is None and from_zero and np.ndim(tokens) == 2 and np.shape(tokens)[1] > limit:
    raise ValueError(f"a sequence of {np.shape(tokens)[1]} tokens exceeds "
                     f"max_position_embeddings={limit} (positions 0..{np.shape(tokens)[1] - 1})")
  real = (np.asarray(segment_ids) != 0) if _concrete(segment_ids) else True
  if _concrete(tokens):
    t = np.asarray(tokens)
    bad = t[((t < 0) | (t >= vocab)) & real]
    if bad.size:
      raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab}) "
                       f"(model.vocab_size={vocab})")
  if _concrete(positions):
    p = np.asarray(positions)
    bad = p[((p < 0) | (p >= limit)) & real]
    if bad.size:
      raise ValueError(f"position {int(bad[0])} is outside [0, {limit}) "
                       f"(max_position_embeddings={limit})")


def rises_by_one(positions_BxT, segment_ids_BxT) -> bool:
  """Whether concrete positions rise by one per token within each segment and each row's
  segments come in runs in order (left padding, packed documents): then causal attention by
  position is causal attention by index within a segment. False for traced arrays (unknown)."""
  if not (_concrete(positions_BxT) and _concrete(segment_ids_BxT)):
    return False
  pos, seg = np.asarray(positions_BxT), np.asarray(segment_ids_BxT)
  same = seg[:, 1:] == seg[:, :-1]
  steps_ok = ~(same & (seg[:, 1:] != 0)) | (pos[:, 1:] == pos[:, :-1] + 1)
  return bool(np.all(steps_ok) and np.all(seg[:, 1:] >= seg[:, :-1]))


def _nan_rows(config: ModelConfig, logits_BxTxV, tokens, positions, segment_ids):
  """NaN logits for rows holding an out-of-range token id or position (padding aside).

  Concrete inputs raise in `check_inputs`; traced ones (a user's own jit) cannot, and a clamped
  embedding would be a silently wrong answer. NaN makes the loss and a training loop's divergence
  check fail loudly. The forward pass itself stays finite (ids are clipped before the gather),
  so rows without a bad input keep finite gradients: `where` sends them their cotangent only.
  """
  vocab, limit = config.vocab_size, config.max_position_embeddings
  ok_BxT = ((tokens >= 0) & (tokens < vocab) & (positions >= 0) & (positions < limit)) | (
      segment_ids == 0)
  return jnp.where(jnp.all(ok_BxT, axis=1)[:, None, None], logits_BxTxV, jnp.nan)


class RMSNorm(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = config.rms_norm_eps
    self.scale = param(rngs, config, (config.hidden_size,), ("norm",), init="ones")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    e, f = config.hidden_size, config.intermediate_size
    self.dtype = config.compute_dtype
    self.gate_proj = param(rngs, config, (e, f), ("embed", "mlp"))
    self.up_proj = param(rngs, config, (e, f), ("embed", "mlp"))
    self.down_proj = param(rngs, config, (f, e), ("mlp", "embed"))

  def __call__(self, x_BxTxE):
    w = lambda p: p[...].astype(self.dtype)
    gate = jnp.einsum("bte,ef->btf", x_BxTxE, w(self.gate_proj))
    up = jnp.einsum("bte,ef->btf", x_BxTxE, w(self.up_proj))
    return jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, w(self.down_proj))


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, computes_kv: bool, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config, rngs=rngs)
    self.attn = Attention(config, computes_kv, rngs=rngs)
    self.post_attention_norm = RMSNorm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)


class Block(nnx.Module):
  """`period` layers whose parameters carry a leading `layers` axis of size `num_blocks`."""

  def __init__(self, config: ModelConfig, run: lt_lib.Run, *, rngs: nnx.Rngs):

    @nnx.split_rngs(splits=run.num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return nnx.List([DecoderLayer(config, role.computes_kv, rngs=rngs) for role in run.roles])

    self.layers = make(rngs)


@dataclasses.dataclass(frozen=True)
class _Context:
  """Per-call constants shared by every layer: the mode, query positions, RoPE tables, cache
  write slots."""
  config: ModelConfig
  mode: Mode
  positions: jax.Array  # [batch, seq]
  segment_ids: jax.Array  # [batch, seq]
  cos_sin: tuple[jax.Array, jax.Array]
  write_index: jax.Array | None  # [batch] first cache slot of this chunk; None in TRAIN
  # The chunk attends to its own keys only, causal by index: TRAIN, or PREFILL_EMPTY without
  # padding; the fused kernels need that.
  own_keys: bool = False
  packed: bool = False  # rows of packed documents without a cache (fused kernels: segment ids)
  contiguous: bool = False  # `KVCache.contiguous`: a decode step may read only each row's span
  masks: dict = dataclasses.field(default_factory=dict)  # dense masks of the parallel mode, made
  #                                                        once per (diag_masked, window)

  def write(self, entry: KV | None, k, v) -> KV:
    """Stores this chunk's KV for one layer: the whole entry without a cache, else at its slots."""
    if self.write_index is None:
      return KV(k, v, self.positions, self.segment_ids)
    return cache_lib.write(entry, k, v, self.positions, self.segment_ids, self.write_index)

  def zeros(self, entry: KV | None) -> KV:
    """The first iteration's KV of an upper layer: zeros at this chunk's slots
    (docs/spec.md §4)."""
    c = self.config
    b, t = self.positions.shape
    z = jnp.zeros((b, t, c.num_kv_heads, c.resolved_head_dim), c.compute_dtype)
    return self.write(entry, z, z)

  def compat_decode(self, role: lt_lib.Role) -> bool:
    """The reference's decoding of an upward-attending layer (docs/spec.md §5, 'whynlp_main'):
    it prepends a zero KV slot and drops the newest one, so token p sees {0, KV_0..KV_{p-2}}."""
    return (role.upward and self.config.decode_semantics == "whynlp_main"
            and self.mode is Mode.DECODE)

  def attention(self, role: lt_lib.Role, kv: KV) -> tuple[dispatch.Plan, dispatch.Inputs]:
    """How layers of this role attend to `kv` in this call: the plan and the arrays its kernel
    reads."""
    window = self.config.sliding_window if role.sliding else None
    mask = dispatch.Mask(role.diag_masked, window, self.packed,
                         zero_key=self.compat_decode(role))
    kernel = dispatch.choose(self.config, self.mode, mask, own_keys=self.own_keys,
                             contiguous=self.contiguous, slots=kv.k.shape[1])
    plan = dispatch.Plan(self.mode, kernel, mask)
    if kernel in dispatch.READS_SPAN:
      return plan, dispatch.Inputs(span=self._decode_span(role, kv))
    if kernel not in dispatch.READS_MASK:
      return plan, dispatch.Inputs(segment_ids=self.segment_ids if self.packed else None)
    return plan, dispatch.Inputs(dense_mask=self._dense_mask(role, kv, window))

  def _decode_span(self, role: lt_lib.Role, kv: KV) -> tuple[jax.Array, jax.Array]:
    """(start, end) [batch]: the cache slots a decode step attends to (contiguous rows)."""
    # A row's valid slots are the last ones written, up to this token's (slot x at x % slots,
    # so this holds for ring buffers, whose valid slots may wrap around). This token's slot is
    # written by now: by its source, or with zeros for a source above (`_cyclic_group`); `end`
    # then excludes it where the diagonal is masked.
    start = self.write_index + 1 - jnp.sum(kv.seg != 0, axis=1, dtype=jnp.int32)
    end = self.write_index + (0 if role.diag_masked else 1)  # this token's slot is write_index
    if role.sliding:
      start = jnp.maximum(start, self.write_index + 1 - self.config.sliding_window)
    return start, end

  def _dense_mask(self, role: lt_lib.Role, kv: KV, window: int | None) -> jax.Array:
    if self.write_index is None:
      return self.masks[(role.diag_masked, window)]
    mask = make_mask(self.positions, self.segment_ids, kv.pos, kv.seg,
                     diag_masked=role.diag_masked, window=window)
    if self.compat_decode(role):
      mask &= kv.pos[:, None, :] < self.positions[:, :, None] - 1
    return mask


def _layer_pass(layer: DecoderLayer, role: lt_lib.Role, offset: int, h, external: dict,
                own: dict, ctx: _Context):
  """One decoder layer: write own KV if it computes KV, then attend to its source's KV.

  `own`: the KV of this block's layers by offset (updated here); `external`: the KV of layers
  outside the run, by layer.
  """
  x = layer.input_norm(h)
  if role.computes_kv:
    k, v = layer.attn.project_kv(x, ctx.cos_sin)
    own[offset] = ctx.write(own.get(offset), k, v)
  source = own[role.source] if role.in_block else external[role.source]
  plan, inputs = ctx.attention(role, source)
  h = h + layer.attn(x, ctx.cos_sin, source, plan, inputs)
  return h + layer.mlp(layer.post_attention_norm(h))


def _apply_run(run: lt_lib.Run, block_def, block_state, h, store: dict, ctx: _Context):
  """Runs the layers of one run (a `lax.scan` over its blocks); returns h and the store (layer ->
  KV) with the run's KV layers updated."""
  computing = [o for o, r in enumerate(run.roles) if r.computes_kv]
  # KVs that blocks read from outside the run are constants of the scan.
  external = {r.source: store[r.source] for r in run.roles if not r.in_block}
  # Existing entries of this run's own KV layers (cache buffers, or a previous iteration's KV
  # read upward inside a block), per block, by offset.
  own = [{o: store[run.layer(b, o)] for o in computing if run.layer(b, o) in store}
         for b in range(run.num_blocks)]

  def body(h, xs):
    state, own_b = xs
    layers = nnx.merge(block_def, state)
    own_b = dict(own_b)
    for o, (layer, role) in enumerate(zip(layers, run.roles)):
      h = _layer_pass(layer, role, o, h, external, own_b, ctx)
      h = sharding.constrain(h, sharding.RESIDUAL)  # a layer boundary (no-op without a mesh)
    return h, {o: own_b[o] for o in computing}

  if ctx.config.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[ctx.config.remat], prevent_cse=False)
  store = dict(store)
  if run.num_blocks == 1 or ctx.mode is Mode.DECODE:
    # A decode step unrolls the blocks: each layer's cache buffer is then updated in place, where
    # a scan would stack every buffer into its inputs and outputs and copy the whole cache per
    # token (H100, 1b llama, batch 32: 6.6 ms per token scanned, 3.0 unrolled, 1.8 with
    # scan_layers=False, which also saves slicing the stacked weights). Prefill chunks keep the
    # scan: unrolling the iteration plan multiplies compile time (7 s -> 43 s for 1b lckv).
    for b in range(run.num_blocks):
      h, ys = body(h, (jax.tree.map(lambda x: x[b], block_state), own[b]))
      store.update({run.layer(b, o): ys[o] for o in computing})
    return h, store
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *own) if own[0] else own[0]
  h, ys = jax.lax.scan(body, h, (block_state, stacked))
  for o in computing:
    for b in range(run.num_blocks):
      store[run.layer(b, o)] = jax.tree.map(lambda x: x[b], ys[o])
  return h, store


class Transformer(nnx.Module):
  """The decoder. `config.layer_types` decides which layers own K/V weights and which KV each reads."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    lt = config.layer_spec
    self.segments = tuple((seg, lt_lib.scan_runs(lt, seg, config.scan_layers))
                          for seg in lt.plan())
    self.embed = param(rngs, config, (config.vocab_size, config.hidden_size), ("vocab", "embed"))
    self.blocks = nnx.List([Block(config, run, rngs=rngs)
                            for _, runs in self.segments for run in runs])
    self.final_norm = RMSNorm(config, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = param(rngs, config, (config.hidden_size, config.vocab_size), ("embed", "vocab"))

  # -- structure -------------------------------------------------------------------------------

  @property
  def runs(self) -> tuple[lt_lib.Run, ...]:
    return tuple(run for _, runs in self.segments for run in runs)

  def layer_location(self, i: int) -> tuple[int, int, int]:
    """(block module index, index along the stacked `layers` axis, offset in the block) of layer i."""
    for r, run in enumerate(self.runs):
      if run.start <= i < run.end:
        return r, (i - run.start) // run.period, (i - run.start) % run.period
    raise IndexError(f"layer {i} out of range 0..{self.config.num_layers - 1}")

  def layer_params(self, i: int) -> nnx.State:
    """Parameters of layer i (unstacked), e.g. `{'attn': {'q_proj': ...}, 'mlp': ...}`."""
    r, b, o = self.layer_location(i)
    return jax.tree.map(lambda x: x[b], nnx.state(self.blocks[r].layers[o], nnx.Param))

  def set_layer_params(self, i: int, params: dict[str, Any]) -> None:
    """Overwrites layer i's parameters from a nested dict shaped like `layer_params(i)`."""
    r, b, o = self.layer_location(i)

    def assign(module, tree, path):
      for name, value in tree.items():
        if isinstance(value, dict):
          assign(getattr(module, name), value, f"{path}.{name}")
          continue
        var = getattr(module, name, None)
        if not isinstance(var, nnx.Param):
          raise KeyError(f"layer {i} has no parameter {path}.{name}")
        value = jnp.asarray(value, var[...].dtype)
        if value.shape != var[...].shape[1:]:
          raise ValueError(f"layer {i} parameter {path}.{name}: expected shape "
                           f"{var[...].shape[1:]}, got {value.shape}")
        var[...] = var[...].at[b].set(value)

    assign(self.blocks[r].layers[o], params, "")

  # -- passes ----------------------------------------------------------------------------------

  def _context(self, mode: Mode, positions, segment_ids, write_index, default_inputs: bool,
               contiguous: bool, by_index: bool = False) -> _Context:
    cfg = self.config
    cos_sin = rope_tables(rope_inv_freq(cfg), positions)
    # Default positions and one segment per row, and no earlier keys: plain causal attention by
    # index, which a fused kernel does without a dense mask. So too a chunk into an empty cache
    # whose positions rise by one per token within each segment (`by_index`: left padding).
    empty = mode is Mode.PREFILL_EMPTY and (default_inputs or by_index)
    own_keys = mode is Mode.TRAIN or empty
    # Packed documents without a cache (positions +1 per token within a document): splash masks
    # by segment ids; cuDNN takes the segments as a [batch, 1, T, T] mask beside its causal one.
    packed = (mode is Mode.TRAIN or empty) and not default_inputs
    masks = {}
    if mode is Mode.TRAIN and dispatch.resolve_attention_impl(cfg.attention_impl,
                                                               cfg.dtype) == "dense":
      lt = cfg.layer_spec
      for diag, sliding in set(zip(lt.diag_masked, lt.sliding)):
        window = cfg.sliding_window if sliding else None
        masks[(diag, window)] = make_mask(positions, segment_ids, positions, segment_ids,
                                          diag_masked=diag, window=window)
    return _Context(cfg, mode, positions, segment_ids, cos_sin, write_index, own_keys, packed,
                    contiguous, masks)

  def _run_segment(self, runs, states, h, store, ctx):
    for run, (block_def, block_state) in zip(runs, states):
      h, store = _apply_run(run, block_def, block_state, h, store, ctx)
    return h, store

  def _cyclic_group(self, runs, states, h_in, store, ctx, forward_passes, backward_passes):
    """docs/spec.md §4: m iterations without gradients, then b with; each restarts from h_in."""
    targets = [i for run in runs for i in range(run.start, run.end)
               if self.config.layer_spec.computes_kv[i]]
    kv = {t: ctx.zeros(store.get(t)) for t in targets}

    def iteration(states, h_in, kv):
      h, new = self._run_segment(runs, states, h_in, {**store, **kv}, ctx)
      return h, {t: new[t] for t in targets}

    if forward_passes > 0:
      frozen = [(d, jax.lax.stop_gradient(s)) for d, s in states]
      h_frozen = jax.lax.stop_gradient(h_in)
      kv = jax.lax.fori_loop(0, forward_passes,
                             lambda _, kv: iteration(frozen, h_frozen, kv)[1], kv)
    kv = jax.lax.stop_gradient(kv)
    if backward_passes == 1:
      h, kv = iteration(states, h_in, kv)
    else:
      def body(carry, _):
        kv, _ = carry
        return iteration(states, h_in, kv)[::-1], None
      (kv, h), _ = jax.lax.scan(body, (kv, h_in), None, length=backward_passes)
    return h, {**store, **kv}

  def _forward(self, mode: Mode, tokens, positions, segment_ids, cache: cache_lib.KVCache | None,
               write_index, forward_passes, backward_passes, last_logits: bool = False,
               by_index: bool = False):
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq] integers, got shape {tokens.shape}")
    default_inputs = positions is None and segment_ids is None
    if positions is None:
      start = 0 if write_index is None else write_index[:, None]
      positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
      positions = jnp.broadcast_to(positions, tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
    ctx = self._context(mode, positions, segment_ids, write_index, default_inputs,
                        cache is not None and cache.contiguous, by_index)
    store = {} if cache is None else dict(cache.layers)  # layer -> KV
    # Clipped, so that the pass stays finite for out-of-range ids (`_nan_rows` flags them).
    h = self.embed[...].astype(cfg.compute_dtype)[jnp.clip(tokens, 0, cfg.vocab_size - 1)]
    h = sharding.constrain(h, sharding.RESIDUAL)
    states = [nnx.split(block.layers) for block in self.blocks]
    r = 0
    for seg, runs in self.segments:
      seg_states = states[r:r + len(runs)]
      r += len(runs)
      if seg.cyclic:
        h, store = self._cyclic_group(runs, seg_states, h, store, ctx, forward_passes,
                                      backward_passes)
      else:
        h, store = self._run_segment(runs, seg_states, h, store, ctx)
    if last_logits:  # prefill: only the last token's logits start generation
      h = h[:, -1:]
    h = self.final_norm(h)
    head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
    logits = sharding.constrain(jnp.einsum("bte,ev->btv", h, head.astype(cfg.compute_dtype)),
                                sharding.LOGITS)
    logits = _nan_rows(cfg, logits.astype(jnp.float32), tokens, positions, segment_ids)
    return logits, (None if cache is None else cache.with_layers(
        {j: store[j] for j in cache.layers}))

  # -- modes -----------------------------------------------------------------------------------

  def __call__(self, tokens, positions=None, segment_ids=None, *, forward_passes: int | None = None,
               backward_passes: int | None = None) -> jax.Array:
    """The parallel mode: logits [batch, seq, vocab] (float32) following the iteration plan.

    Args:
      tokens: [batch, seq] int token ids.
      positions: [batch, seq] RoPE positions; default 0..seq-1 (restart them per packed document).
      segment_ids: [batch, seq] document ids of packed sequences (0 = padding); attention never
        crosses a segment. Default: one segment.
      forward_passes, backward_passes: override the config's m and b.

    Raises ValueError for a token id outside [0, vocab_size) or a position past
    `max_position_embeddings` (`check_inputs`); under a jit of your own, where ids and positions
    are not known, a row holding such an input gets NaN logits instead (the other rows and their
    gradients are unaffected), so the loss is NaN rather than silently wrong.
    """
    check_inputs(self.config, tokens, positions, segment_ids)
    if self.config.use_sequential:
      return self.sequential(tokens, positions, segment_ids)
    m = self.config.forward_passes if forward_passes is None else forward_passes
    b = self.config.backward_passes if backward_passes is None else backward_passes
    if m < 0 or b < 1:
      raise ValueError(f"need forward_passes >= 0 and backward_passes >= 1, got {m} and {b}")
    logits, _ = self._forward(Mode.TRAIN, tokens, positions, segment_ids, None, None, m, b)
    return logits

  def step(self, tokens, cache: cache_lib.KVCache, write_index=None, positions=None,
           segment_ids=None, *, mode: Mode | None = None, iterations: int | None = None,
           last_logits: bool = False, by_index: bool = False
           ) -> tuple[jax.Array, cache_lib.KVCache]:
    """A chunk of tokens against a cache: returns logits and the cache with this chunk's KV.

    Args:
      tokens: [batch, chunk].
      cache: a `KVCache` (`lckv_jax.cache`) of this model and batch.
      write_index: [batch] slot where this chunk's first token is written (default 0, for
        `Mode.PREFILL_EMPTY` only).
      positions, segment_ids: [batch, chunk]; default `write_index + 0..chunk-1` and one segment.
      mode: `Mode.DECODE` (one token per row), `Mode.PREFILL` (a chunk after what the cache
        holds) or `Mode.PREFILL_EMPTY` (a chunk from slot 0 of an empty cache: without positions
        and segments, i.e. no padding, attention is causal by index and takes the fused kernel,
        `config.attention_impl`). Default: DECODE for one token, else PREFILL.
      iterations: passes of a cyclic group over the chunk; default 1 for DECODE (exact) and
        m + b for a prefill (the prefill of the reference).
      last_logits: return the logits of the last token only ([batch, 1, vocab]).
      by_index: in `Mode.PREFILL_EMPTY`, the caller vouches that `positions` rise by one per
        token within each segment, segments in runs (left padding: `rises_by_one`); attention
        is then causal by index within a segment, and takes the fused kernel with the segments
        as its mask, as packed documents in training do.

    Out-of-range token ids and positions raise when concrete, else give NaN logits in their row
    (as in `__call__`); the cache then holds that chunk's KV of a clipped id.
    """
    cfg = self.config
    check_inputs(cfg, tokens, positions, segment_ids, from_zero=False)
    chex.assert_rank(tokens, 2)
    if not isinstance(cache, cache_lib.KVCache):
      raise TypeError(f"step: cache must be a lckv_jax.cache.KVCache (KVCache.create), got "
                      f"{type(cache).__name__}")
    for e in cache.layers.values():  # the cache's boundary: this model's KV layout, this batch
      chex.assert_shape([e.k, e.v], (tokens.shape[0], None, cfg.num_kv_heads,
                                     cfg.resolved_head_dim))
      chex.assert_shape([e.pos, e.seg], (tokens.shape[0], e.k.shape[1]))
    if set(cache.layers) != set(cfg.layer_spec.kv_layers):
      raise ValueError(f"step: the cache holds layers {cache.kv_layers}, the model's KV layers "
                       f"are {cfg.layer_spec.kv_layers}")
    mode = mode or (Mode.DECODE if tokens.shape[1] == 1 else Mode.PREFILL)
    if mode is Mode.TRAIN:
      raise ValueError("step runs a chunk against a cache: mode must be DECODE, PREFILL or "
                       "PREFILL_EMPTY (Mode.TRAIN is Transformer.__call__)")
    if mode is Mode.DECODE and tokens.shape[1] != 1:
      raise ValueError(f"Mode.DECODE takes one token per row, got chunks of {tokens.shape[1]}")
    if write_index is None:
      if mode is not Mode.PREFILL_EMPTY:
        raise ValueError(f"step: write_index [batch] is required in {mode}")
      write_index = jnp.zeros((tokens.shape[0],), jnp.int32)
    if iterations is None:
      iterations = 1 if mode is Mode.DECODE else cfg.forward_passes + cfg.backward_passes
    if iterations < 1:
      raise ValueError(f"iterations must be >= 1, got {iterations}")
    return self._forward(mode, tokens, positions, segment_ids, cache, write_index,
                         iterations - 1, 1, last_logits, by_index and mode is Mode.PREFILL_EMPTY)

  def sequential(self, tokens, positions=None, segment_ids=None, *, cache_dtype=None
                 ) -> jax.Array:
    """The exact model: one token at a time, each seeing earlier tokens' KV (docs/spec.md §4).

    `cache_dtype`: the KV cache's storage (default the compute dtype; "int8" or "fp8" quantize
    it, `lckv_jax.quant`), to measure what a cache format costs in quality.
    Bad token ids and positions raise or give NaN rows, as in `__call__`.
    """
    check_inputs(self.config, tokens, positions, segment_ids)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    cache = cache_lib.KVCache.create(self.config, b, t, cache_dtype)
    graphdef, state = nnx.split(self)

    def body(cache, xs):
      i, tok, pos, seg = xs
      model = nnx.merge(graphdef, state)
      logits, cache = model.step(tok[:, None], cache, jnp.full((b,), i, jnp.int32),
                                 pos[:, None], seg[:, None], mode=Mode.DECODE)
      return cache, logits[:, 0]

    xs = (jnp.arange(t), tokens.T, positions.T, segment_ids.T)
    _, logits_TxBxV = jax.lax.scan(body, cache, xs)
    # A bad token poisons its row's later logits too, as in the parallel mode.
    return _nan_rows(self.config, jnp.swapaxes(logits_TxBxV, 0, 1), tokens, positions,
                     segment_ids)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def relayout(model: Transformer, scan_layers: bool, *, free_source: bool = False) -> Transformer:
  """The same model with its layers stacked into scanned runs (`scan_layers=True`) or one
  module per layer (False).

  Training wants stacks (one scanned body: fast compiles). Serving wants one array per layer: a
  decode step that slices a layer out of a stack copies the slice every token (H100, 1b llama,
  batch 32: 2.9 ms per token stacked, 1.7 ms per layer; XLA's dynamic-slice fusion did not help).
  The layer weights pass through host memory. With `free_source` the device arrays of `model`'s
  layers are deleted once copied (the device then never holds two copies; `model` is unusable
  afterwards); otherwise `model` is left as it is.
  """
  cfg = model.config
  if cfg.scan_layers == scan_layers:
    return model
  abstract = nnx.eval_shape(lambda: Transformer(cfg.replace(scan_layers=scan_layers),
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = nnx.state(abstract, nnx.Param)
  new = nnx.to_pure_dict(params)
  new.update({k: v for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items()
              if k != "blocks"})
  host = {}
  if free_source:
    host = {i: jax.tree.map(np.asarray, nnx.to_pure_dict(model.layer_params(i)))
            for i in range(cfg.num_layers)}
    for block in model.blocks:
      for x in jax.tree.leaves(nnx.state(block, nnx.Param)):
        x.delete()

  def layer(i):
    return host.pop(i) if free_source else jax.tree.map(
        np.asarray, nnx.to_pure_dict(model.layer_params(i)))

  for r, run in enumerate(abstract.runs):
    for o in range(run.period):
      per_layer = [layer(run.layer(b, o)) for b in range(run.num_blocks)]
      new["blocks"][r]["layers"][o] = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)),
                                                   *per_layer)
  nnx.replace_by_pure_dict(params, new)
  out = nnx.merge(graphdef, state)
  nnx.update(out, params)
  return out
