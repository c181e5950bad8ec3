"""Generation: prefill a batch of prompts, then decode one token per pass (docs/spec.md §4, §5).

- Prefill runs the prompt through `Transformer.step` with the iteration plan (`iterations`, default
  m + b); a prompt no longer than that number in a model with a cycle runs token by token instead
  (the sequential mode, exact), as the reference does.
- Decoding is a `lax.while_loop` inside one `jit`: one exact pass per token, sampling, per-row EOS
  and budgets. The cache buffers are donated, so they are updated in place.
- Prompts of different lengths share a batch by left padding (`segment_ids` 0 on pads, positions
  counted per row from the first real token). `Generator.insert` puts a freshly prefilled
  sequence into a free row of a running batch (continuous batching).
- `Generator(prefill_chunk=C)` prefills C tokens per call (`PrefillJob`: `begin`, `prefill_next`,
  `finish`), so that a server can run decode steps between a long prompt's chunks. For a model
  with a cycle this iterates per chunk, a different approximation than the one-shot prefill
  (`Generator`'s docstring says how).
- `sink=(n_sink, window)` decodes with a StreamingLLM attention-sink cache (`lckv_jax.cache`):
  constant memory, positions bounded by `n_sink + window`, so generation may run far past
  `max_position_embeddings`.
- `mesh=`: parameters, batch and cache placed by the one rules table (`lckv_jax.sharding`):
  parameters over the `tensor` axis, the batch and cache rows over `data`.

Decode semantics: exact by default (docs/spec.md §5); `ModelConfig.decode_semantics="whynlp_main"`
reproduces the reference code's decoding of upward-attending layers (a zero key, the newest KV
dropped) for comparisons with its released models.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lckv_jax import cache as cache_lib
from lckv_jax import quant
from lckv_jax.attention import KV
from lckv_jax.cache import KVCache
from lckv_jax.tokenizer import ByteTokenizer  # noqa: F401  (the byte fallback, re-exported)
from lckv_jax.mode import Mode
from lckv_jax.model import Transformer, check_inputs, relayout, rises_by_one
from lckv_jax.sampling import Sampling, sample_rows, sample_with
from lckv_jax.sharding import RULES, cache_shardings, logical_to_spec

PREFILL_MODES = ("auto", "parallel", "sequential")


# ---------------------------------------------------------------------------------------------
# Prompts and tokenizers.
# ---------------------------------------------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, pad_id: int = 0,
                pad_to: int | None = None):
  """Left-pads token lists: (tokens, positions, segment_ids) [batch, longest], lengths [batch].

  `pad_to`: pad to this many tokens instead (at least the longest), so that the shapes, and so
  the compiled prefill, do not follow each prompt's length.
  """
  if len(prompts) == 0:
    raise ValueError("prompts: need at least one prompt")
  lengths = [len(p) for p in prompts]
  for n, (p, length) in enumerate(zip(prompts, lengths)):
    if length == 0:
      raise ValueError(f"prompt {n} is empty: every prompt needs at least one token")
    bad = [t for t in p if not 0 <= int(t) < vocab_size]
    if bad:
      raise ValueError(f"prompt {n}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}) "
                       f"(model.vocab_size={vocab_size})")
  longest = max(lengths)
  if pad_to is not None:
    if pad_to < longest:
      raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
    longest = pad_to
  tokens = np.full((len(prompts), longest), pad_id, np.int32)
  segment_ids = np.zeros((len(prompts), longest), np.int32)
  positions = np.zeros((len(prompts), longest), np.int32)
  for r, (p, length) in enumerate(zip(prompts, lengths)):
    tokens[r, longest - length:] = np.asarray(p, np.int32)
    segment_ids[r, longest - length:] = 1
    positions[r, longest - length:] = np.arange(length)
  return tokens, positions, segment_ids, np.asarray(lengths, np.int32)


def _token_id(t) -> int:
  """`t` as an int; a float or a string is refused (int() would truncate 2.7 to 2)."""
  if isinstance(t, (np.ndarray, jax.Array)) and t.ndim == 0 and t.dtype.kind in "iu":
    return int(t)
  if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
    raise ValueError(f"prompts: token ids must be integers, got {t!r} ({type(t).__name__})")
  return int(t)


def _ids(p, ndims=(1,)) -> list:
  """A row (or rows) of token ids given as an array, as lists of ints."""
  arr = np.asarray(p)
  if arr.dtype.kind not in "iu" or arr.ndim not in ndims:
    dims = " or ".join(f"{d}-D" for d in ndims)
    raise ValueError(f"prompts: an array of token ids must be {dims} integers, got {arr.dtype} "
                     f"of shape {arr.shape}")
  return arr.tolist()


def _as_token_lists(prompts, tokenizer) -> tuple[list[list[int]], bool]:
  """Prompts as token-id lists, and whether they came as text."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if isinstance(prompts, (np.ndarray, jax.Array)):
    ids = _ids(prompts, (1, 2))
    return ([ids] if np.ndim(prompts) == 1 else ids), False
  prompts = list(prompts)
  if prompts and all(isinstance(p, str) for p in prompts):
    if tokenizer is None:
      raise ValueError("text prompts need a tokenizer (or ByteTokenizer() for a byte vocabulary)")
    return [list(tokenizer.encode(p)) for p in prompts], True
  if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
    return [[_token_id(t) for t in prompts]], False
  if any(isinstance(p, str) for p in prompts):
    raise ValueError("prompts: give all text or all token-id lists, not a mix")
  return [_ids(p) if isinstance(p, (np.ndarray, jax.Array)) else [_token_id(t) for t in p]
          for p in prompts], False


# ---------------------------------------------------------------------------------------------
# Sharding: logical axis names of the parameters -> mesh axes (`lckv_jax.sharding.RULES`).
# ---------------------------------------------------------------------------------------------


def shard_model(model: Transformer, mesh: Mesh, rules: dict | None = None) -> None:
  """Places every parameter on `mesh` following its logical axes (`out_sharding` metadata)."""
  rules = {**RULES, **(rules or {})}
  params = nnx.state(model, nnx.Param)

  def put(var):
    axes = var.get_metadata().get("out_sharding") or (None,) * var[...].ndim
    return var.replace(jax.device_put(var[...], NamedSharding(
        mesh, logical_to_spec(axes, var[...].shape, mesh, rules))))

  nnx.update(model, jax.tree.map(put, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _shard_state(state, mesh: Mesh | None, rules: dict | None = None):
  """Decode state on the mesh: the cache as `cache_shardings` names it; every other array by its
  batch axis (the first), the rest replicated."""
  if mesh is None:
    return state
  rules = {**RULES, **(rules or {})}

  def put(x):
    if isinstance(x, KV):
      return jax.device_put(x, cache_shardings(x, mesh, rules))
    if not isinstance(x, jax.Array) or x.ndim == 0 or jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      return x
    axes = ("activation_batch",) + (None,) * (x.ndim - 1)
    return jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))

  return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, KV))


# ---------------------------------------------------------------------------------------------
# Prefill.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(10,))
def _prefill(graphdef, mode: Mode, iterations: int, sequential: bool, all_logits: bool,
             by_index: bool, params, tokens, positions, segment_ids, cache: KVCache, write_index):
  model = nnx.merge(graphdef, params)
  if sequential:
    if positions is None:  # Mode.PREFILL_EMPTY without padding
      positions = write_index[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
      segment_ids = jnp.ones_like(tokens)

    def body(cache, xs):
      t, tok, pos, seg = xs
      logits, cache = model.step(tok[:, None], cache, write_index + t, pos[:, None], seg[:, None],
                                 mode=Mode.DECODE)
      return cache, logits[:, 0]
    xs = (jnp.arange(tokens.shape[1]), tokens.T, positions.T, segment_ids.T)
    cache, logits_TxBxV = jax.lax.scan(body, cache, xs)
    logits = jnp.swapaxes(logits_TxBxV, 0, 1)
  else:
    roomy = cache.widen(write_index, tokens.shape[1], empty=mode is Mode.PREFILL_EMPTY)
    logits, roomy = model.step(tokens, roomy, write_index, positions, segment_ids, mode=mode,
                               iterations=iterations, last_logits=not all_logits,
                               by_index=by_index)
    cache = roomy.compact(write_index + tokens.shape[1], like=cache)
  return (logits if all_logits else logits[:, -1]), cache


def prefill(model: Transformer, tokens, positions, segment_ids, cache: KVCache, write_index=None,
            *, mode: Mode = Mode.PREFILL, iterations: int | None = None,
            prefill_mode: str = "auto", all_logits: bool = False, split=None,
            rule_chunk: int | None = None, compile_only: bool = False):
  """Runs a chunk of prompt tokens into `cache` (donated) at `write_index` [batch].

  Args:
    tokens: [batch, chunk]; positions, segment_ids: [batch, chunk] (left padding: segment 0), or
      both None: positions `write_index + 0..chunk-1`, no padding.
    mode: `Mode.PREFILL` (the chunk follows what each row's cache holds) or
      `Mode.PREFILL_EMPTY` (every row starts at slot 0 of an empty cache; `write_index` may be
      None): ring buffers are then not widened for earlier keys, and without positions and
      segments the parallel prefill takes the fused attention kernel.
    iterations: passes of a cyclic group over the chunk; default forward_passes + backward_passes.
    prefill_mode: 'auto' (sequential for a model with a cycle and a chunk no longer than
      `iterations`, else parallel), 'parallel' or 'sequential'.
    split: `nnx.split(model)`, when the caller holds it (`Generator(static_weights=True)`).
    rule_chunk: the chunk length 'auto' decides on (default this call's): a chunked prefill's
      narrower first chunk iterates as its whole chunks do.
    compile_only: compile the call ahead of time (`cache` may be shapes, `jax.ShapeDtypeStruct`),
      run nothing, return None; a later call of these shapes runs the compiled program.
  Returns:
    logits [batch, vocab] of the last token ([batch, chunk, vocab] with `all_logits`), and the
    cache.
  """
  cfg = model.config
  if prefill_mode not in PREFILL_MODES:
    raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {prefill_mode!r}")
  if mode not in (Mode.PREFILL, Mode.PREFILL_EMPTY):
    raise ValueError(f"prefill: mode must be Mode.PREFILL or Mode.PREFILL_EMPTY, got {mode}")
  if (positions is None) != (segment_ids is None):
    raise ValueError("prefill: give both positions and segment_ids, or neither")
  # Here, not in the jitted prefill, where ids and positions are no longer known.
  check_inputs(cfg, tokens, positions, segment_ids, from_zero=False)
  iterations = cfg.forward_passes + cfg.backward_passes if iterations is None else iterations
  if not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"prefill iterations must be an integer >= 1, got {iterations!r}")
  if write_index is None:
    if mode is not Mode.PREFILL_EMPTY:
      raise ValueError("prefill: write_index [batch] is required in Mode.PREFILL")
    write_index = np.zeros((tokens.shape[0],), np.int32)
  chunk = tokens.shape[1]
  sequential = prefill_mode == "sequential" or (
      prefill_mode == "auto" and cfg.layer_spec.has_cycle
      and ((rule_chunk or chunk) <= iterations or cfg.use_sequential))
  graphdef, params = nnx.split(model) if split is None else split
  # Left-padded prompts into an empty cache: the fused kernel, the padding masked by segment
  # (on the H200, a [4, 256] 7b LCKV chunk took 159 ms against 205 ms through the dense
  # mask over a 1,024-slot cache).
  by_index = (mode is Mode.PREFILL_EMPTY and positions is not None
              and rises_by_one(positions, segment_ids))
  as_array = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
  args = (graphdef, mode, iterations, sequential, all_logits, by_index, params,
          jnp.asarray(tokens), as_array(positions), as_array(segment_ids), cache,
          jnp.asarray(write_index, jnp.int32))
  if compile_only:
    _prefill.lower(*args).compile()
    return None
  return _prefill(*args)


# ---------------------------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_cache(config, batch: int, max_len: int, dtype) -> KVCache:
  """A job's cache in one call (op by op, `KVCache.create` was 17% of a CPU server's engine)."""
  return KVCache.create(config, batch, max_len, dtype, contiguous=True)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_rows(cache: KVCache, rows: KVCache, start) -> KVCache:
  return cache.put_rows(rows, start)  # `cache` donated: in place


class RowSampling(NamedTuple):
  """Each row's own sampling settings, for a batch that mixes requests (a server's)."""
  temperature: jax.Array  # [B] float32, 0 = greedy
  top_k: jax.Array  # [B] int32, 0 = no limit
  top_p: jax.Array  # [B] float32, 1 = no limit
  key: jax.Array  # [B] PRNG keys: a row's i-th new token is drawn with fold_in(key, i), so a
  #                 request's tokens depend on its seed only, never on the rest of the batch


def row_arrays(settings: Sequence[Sampling], seeds: Sequence[int]) -> tuple[np.ndarray, ...]:
  """Each row's (temperature, top_k, top_p, seed) as host arrays: a `RowSampling`'s makings."""
  if len(settings) != len(seeds):
    raise ValueError(f"row sampling: {len(settings)} settings for {len(seeds)} seeds")
  return (np.asarray([s.temperature for s in settings], np.float32),
          np.asarray([s.top_k for s in settings], np.int32),
          np.asarray([s.top_p for s in settings], np.float32), np.asarray(seeds, np.uint32))


def row_sampling(settings: Sequence[Sampling], seeds: Sequence[int]) -> RowSampling:
  """RowSampling of one setting and one seed per row."""
  return _row_sampling(row_arrays(settings, seeds))


def _row_sampling(arrays) -> RowSampling:
  temperature, top_k, top_p, seeds = arrays
  return RowSampling(jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p),
                     jax.vmap(jax.random.key)(jnp.asarray(seeds)))


class DecodeState(NamedTuple):
  """A running batch. Each row decodes on its own (own slot, position, budget, EOS)."""
  cache: KVCache
  token: jax.Array  # [B] int32, the last sampled token: the next input
  write_index: jax.Array  # [B] int32, the slot `token` is written to
  position: jax.Array  # [B] int32, the RoPE position of `token`
  done: jax.Array  # [B] bool, EOS sampled or budget reached (or a free row)
  num_generated: jax.Array  # [B] int32, tokens in `tokens`
  max_new: jax.Array  # [B] int32, the budget of the row
  tokens: jax.Array  # [B, max_new_tokens] int32, generated tokens (pad_id beyond)
  logits: Any  # [B, max_new_tokens, vocab] float32 with return_logits, else None
  rng: jax.Array  # PRNG key of the batch
  rows: RowSampling | None = None  # each row's sampling (Generator(per_row_sampling=True))


def first_chunk_sizes(chunk: int, widths: int | None = None) -> tuple[int, ...]:
  """The widths a chunked prefill's first chunk may take: C/4, C/2 or C tokens, or with
  `widths=N` the N multiples of C/N (rounded up). Each width is one compilation per job size;
  finer ones pad short prompts less (prompts of 32-511 tokens in chunks of 512 pad to 366 slots
  on average with the three, 302 with 8 widths)."""
  if widths is None:
    return tuple(sorted({max(1, chunk // 4), max(1, chunk // 2), chunk}))
  return tuple(sorted({-(-chunk * i // widths) for i in range(1, widths + 1)}))


def chunked_length(n: int, chunk: int, widths: int | None = None) -> int:
  """Slots a prompt of `n` tokens takes in a chunked prefill: whole chunks of `chunk` after a
  first chunk of the smallest `first_chunk_sizes(chunk, widths)` that holds the rest, the
  padding on its left.

  The chunks end where whole chunks would (the prompt's last token ends the last), so each chunk
  holds the same prompt tokens as with padding to whole chunks, which only computes more
  padding: prompts of 32-511 tokens in chunks of 256 pad to 319 on average, not 392.
  """
  full = -(-n // chunk)
  rest = n - chunk * (full - 1)
  return next(f for f in first_chunk_sizes(chunk, widths) if f >= rest) + chunk * (full - 1)


def check_widths(widths, chunk) -> None:
  """`prefill_widths`: None, or a positive integer with a `prefill_chunk` to divide."""
  if widths is None:
    return
  if isinstance(widths, bool) or not isinstance(widths, (int, np.integer)) or widths < 1:
    raise ValueError(f"prefill_widths must be a positive integer or None, got {widths!r}")
  if chunk is None:
    raise ValueError(f"prefill_widths={widths} needs a prefill_chunk: the widths are those of a "
                     "chunked prefill's first chunk")


@dataclasses.dataclass(frozen=True)
class PrefillJob:
  """Prompts on their way into a cache, one chunk per `Generator.prefill_next` call.

  `Generator.begin` makes it (host work: padding and checks), `prefill_next` runs the next chunk
  on the device, `finish` samples the first tokens once `done`. A server interleaves these calls
  with decode steps, so a long prompt never holds up the running rows for its whole prefill.
  `cache` is donated to each chunk: keep the job returned, never an earlier one.
  """
  tokens: np.ndarray  # [batch, padded] int32, left-padded (`chunked_length`)
  positions: np.ndarray  # [batch, padded] int32, counted from each row's first real token
  segment_ids: np.ndarray  # [batch, padded] int32, 0 on padding, 1 on the prompt
  lengths: np.ndarray  # [batch] int32, real tokens of each prompt
  budget: np.ndarray  # [batch] int32, new tokens of each row
  chunk: int  # tokens per chunk: Generator.prefill_chunk, or `padded` (the whole prompt at once)
  seed: int | jax.Array  # the batch's PRNG seed or key (`start`'s `seed`)
  sampling: tuple[Sampling, ...] | None  # each row's sampling and seed, with per_row_sampling
  seeds: tuple[int, ...] | None
  cache: KVCache | None = None  # [batch, max_len slots]: the chunks so far (None before the first)
  logits: jax.Array | None = None  # [batch, vocab] of the last token of the last chunk run
  chunks_done: int = 0

  @property
  def num_chunks(self) -> int:
    return -(-self.tokens.shape[1] // self.chunk)

  def bounds(self, k: int) -> tuple[int, int]:
    """The slots [start, end) of chunk k: a first chunk of the rest (`chunked_length`), then
    whole chunks."""
    first = self.tokens.shape[1] - self.chunk * (self.num_chunks - 1)
    return (0, first) if k == 0 else (first + (k - 1) * self.chunk, first + k * self.chunk)

  @property
  def done(self) -> bool:
    return self.chunks_done == self.num_chunks

  @staticmethod
  def stack(jobs: Sequence[PrefillJob], pad_id: int = 0) -> PrefillJob:
    """Jobs not yet started, of one number of chunks and chunk, as one job of all their rows:
    the prompts a server admits together prefill in one [rows, C] call each chunk, not one call
    a prompt (a 1b chunk of [1, 256] tokens reads the weights for 0.6 TFLOP of work). Rows of a
    narrower first chunk are left-padded (`pad_id`) to the widest. Each row keeps its own
    sampling, seed and budget, and its padding is masked, so its tokens are those of its own
    job."""
    first = jobs[0]
    if any(j.cache is not None or j.chunks_done for j in jobs):
      raise ValueError("PrefillJob.stack: every job must be unstarted (no chunk run yet)")
    shapes = {(j.num_chunks, j.chunk, j.sampling is None) for j in jobs}
    if len(shapes) > 1:
      raise ValueError(f"PrefillJob.stack: the jobs differ in (chunks, chunk, per-row "
                       f"sampling): {sorted(shapes)}")
    width = max(j.tokens.shape[1] for j in jobs)

    def cat(f):
      pad = {"tokens": pad_id}.get(f, 0)
      return np.concatenate([
          np.pad(a, ((0, 0), (width - a.shape[1], 0)), constant_values=pad) if a.ndim == 2
          and a.shape[1] < width else a for a in (getattr(j, f) for j in jobs)])
    rows = lambda f: None if first.sampling is None else tuple(  # noqa: E731
        x for j in jobs for x in getattr(j, f))
    return PrefillJob(tokens=cat("tokens"), positions=cat("positions"),
                      segment_ids=cat("segment_ids"), lengths=cat("lengths"),
                      budget=cat("budget"), chunk=first.chunk, seed=first.seed,
                      sampling=rows("sampling"), seeds=rows("seeds"))


@dataclasses.dataclass(frozen=True)
class _Settings:
  sampling: Sampling
  eos_ids: tuple[int, ...]
  pad_id: int
  stream: Callable | None


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))
def _started(settings: _Settings, n: int, vocab: int, sink: bool, from_seed: bool, cache,
             logits_BxV, seed, lengths, budget, padded, rows) -> DecodeState:
  """The decode state of a prefilled job (`Generator.finish`), its first tokens sampled: one
  call, where a dozen eager ops took 9 ms of a 1b server's host per job on the H200. `n`: the
  budget's slots of tokens; `vocab`: logits kept per token (0: none); `sink`: rows left-aligned
  (slot = position); `seed`: an int (`from_seed`) or a PRNG key; `rows`: each row's
  (temperature, top_k, top_p, seed) or None; `cache` donated."""
  b = lengths.shape[0]
  rng, key = jax.random.split(jax.random.key(seed) if from_seed else seed)
  write_index = padded
  if sink:
    cache, write_index = cache.left_align(padded - lengths), lengths
  state = DecodeState(
      cache=cache, token=jnp.zeros((b,), jnp.int32), write_index=write_index,
      position=lengths, done=jnp.zeros((b,), bool), num_generated=jnp.zeros((b,), jnp.int32),
      max_new=budget, tokens=jnp.full((b, n), settings.pad_id, jnp.int32),
      logits=jnp.zeros((b, n, vocab), jnp.float32) if vocab else None, rng=rng,
      rows=None if rows is None else _row_sampling(rows))
  return _finish(settings, state, logits_BxV, key)


def _finish(settings: _Settings, state: DecodeState, logits_BxV, key) -> DecodeState:
  """Samples the next token of every active row and records it."""
  if state.rows is None:
    nxt = sample_with(settings.sampling, logits_BxV, key)
  else:
    r = state.rows
    keys = jax.vmap(jax.random.fold_in)(r.key, state.num_generated)
    nxt = sample_rows(logits_BxV, keys, r.temperature, r.top_k, r.top_p)
  active = ~state.done
  rows = jnp.arange(nxt.shape[0])
  idx = jnp.minimum(state.num_generated, state.tokens.shape[1] - 1)
  tokens = state.tokens.at[rows, idx].set(jnp.where(active, nxt, state.tokens[rows, idx]))
  logits = state.logits
  if logits is not None:
    logits = logits.at[rows, idx].set(
        jnp.where(active[:, None], logits_BxV.astype(logits.dtype), logits[rows, idx]))
  if settings.stream is not None:
    jax.debug.callback(settings.stream, nxt, active, ordered=True)
  num_generated = state.num_generated + active
  is_eos = jnp.zeros_like(active)
  for e in settings.eos_ids:
    is_eos |= nxt == e
  done = state.done | (active & is_eos) | (num_generated >= state.max_new)
  return state._replace(token=jnp.where(active, nxt, state.token), done=done,
                        num_generated=num_generated, tokens=tokens, logits=logits)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode(graphdef, settings: _Settings, params, state: DecodeState, num_steps):
  model = nnx.merge(graphdef, params)

  def cond(carry):
    i, s = carry
    return (i < num_steps) & ~jnp.all(s.done)

  def body(carry):
    i, s = carry
    cache, write_index, position = s.cache, s.write_index, s.position
    if cache.n_sink is not None:
      cache, write_index = cache.evict_sink(model.config, write_index)
      position = write_index
    logits, cache = model.step(s.token[:, None], cache, write_index, position[:, None],
                               jnp.ones_like(position)[:, None], mode=Mode.DECODE)
    rng, key = jax.random.split(s.rng)
    active = ~s.done
    s = s._replace(cache=cache, rng=rng,
                   write_index=jnp.where(active, write_index + 1, write_index),
                   position=jnp.where(active, position + 1, position))
    return i + 1, _finish(settings, s, logits[:, 0], key)

  steps, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state, steps


def _serving_layout(model: Transformer, unstack: bool | None) -> Transformer:
  """`model` with one array per layer for decoding (see `lckv_jax.model.relayout`).

  unstack=None: on a GPU, when a second copy of the layer weights fits in half the free device
  memory (the caller keeps its stacked model); else the model as given, with a warning on GPU.
  """
  if not model.config.scan_layers or unstack is False:
    return model
  if unstack is None:
    if jax.default_backend() != "gpu":
      return model
    stats = jax.devices()[0].memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    size = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if 2 * size > free:
      logging.warning(
          "Generator: decoding with stacked layer weights (scan_layers=True), which copies "
          "every layer's weights each token; no room for an unstacked copy. Load the model with "
          "scan_layers=False (load_model(path, scan_layers=False)) for faster decoding.")
      return model
  return relayout(model, scan_layers=False)


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert_rows(state: DecodeState, new: DecodeState, rows) -> DecodeState:
  """`state` (donated: in place) with rows `rows[i]` replaced by row i of `new`; an index past
  the batch skips that row."""
  cache = state.cache.insert_rows(rows, new.cache)
  rest = {f: jax.tree.map(lambda a, c: a.at[rows].set(c, mode="drop"), getattr(state, f),
                          getattr(new, f))
          for f in DecodeState._fields if f not in ("cache", "rng")}
  return state._replace(cache=cache, **rest)


class Generator:
  """Prefill and decode loop for one model and one set of generation settings.

  >>> gen = Generator(model, max_len=256, max_new_tokens=64, eos_id=2)
  >>> state = gen.start([[1, 5, 9], [1, 7]])      # prefill + first token
  >>> state = gen.decode(state)                    # until EOS or the budgets
  >>> gen.results(state)                           # [[...], [...]]

  Continuous batching: `gen.decode(state, num_steps=k)`, then `gen.insert(state, row,
  gen.start([prompt]))` into a row whose `done` is set, and decode on (`insert_rows` puts the
  rows of a job of several prompts into as many free rows in one call).

  Chunked prefill: with `prefill_chunk=C` a prompt goes into its cache C tokens per call after
  a first chunk of C/4, C/2 or C tokens (or with `prefill_widths=N`, a multiple of C/N) that
  holds the rest and the left padding (`chunked_length`). `start` is `begin`, `prefill_next` per
  chunk and `finish`, which a server calls one at a time between decode steps (`lckv_jax.serve.engine`), so
  a long prompt never stalls the running rows for its whole prefill. For a model without a cycle
  (every layer reads the KV of itself or a layer below) this is the function of the one-shot
  prefill, up to float rounding. For a model with a cycle (a layer attends to a layer above it:
  LCKV, `0_2_2_3`) it is another approximation of the exact model, still a valid one: each
  chunk runs the plan's `prefill_iterations` passes over its own tokens given the final KV of
  the earlier chunks, where the one-shot prefill iterates over the whole prompt at once. (With
  `prefill_mode='auto'` and C <= the iterations, each chunk runs token by token: exact.)

  Speed: `prefill_batch` prefills that many rows at a time (long prompts at a large batch);
  `unstack` decodes with one weight array per layer (default: on GPU, when a copy fits);
  `config.decode_attention` picks the decode kernel (on GPU one that reads each row's valid
  cache prefix only); `static_weights` splits the model into graph and arrays once, for a caller
  that never changes the weights (a server calls the model every few steps).
  """

  def __init__(self, model: Transformer, *, max_new_tokens: int, max_len: int | None = None,
               sampling: Sampling = Sampling(), eos_id: int | Sequence[int] | None = None,
               pad_id: int = 0, prefill_iterations: int | None = None,
               prefill_mode: str = "auto", sink: tuple[int, int] | None = None,
               return_logits: bool = False, mesh: Mesh | None = None,
               stream: Callable | None = None, cache_dtype=None,
               prefill_batch: int | None = None, unstack: bool | None = None,
               per_row_sampling: bool = False, prefill_chunk: int | None = None,
               prefill_widths: int | None = None, static_weights: bool = False):
    cfg = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
      raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
    if prefill_mode not in PREFILL_MODES:
      raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {prefill_mode!r}")
    if prefill_batch is not None and (not isinstance(prefill_batch, int) or prefill_batch < 1):
      raise ValueError(f"prefill_batch must be a positive integer or None, got {prefill_batch!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(
        prefill_chunk, (int, np.integer)) or prefill_chunk < 1):
      raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    check_widths(prefill_widths, prefill_chunk)
    if prefill_chunk is not None and sink is not None:
      raise ValueError(f"prefill_chunk={prefill_chunk} with sink={sink}: chunked prefill into a "
                       "sink cache is not supported; give one of them")
    if prefill_chunk is not None and prefill_batch is not None:
      raise ValueError(f"prefill_chunk={prefill_chunk} with prefill_batch={prefill_batch}: give "
                       "one of them (a chunk already bounds the prefill's activations to "
                       "batch x chunk tokens)")
    if sink is not None:
      n_sink, window = sink
      if n_sink < 0 or window < 1:
        raise ValueError(f"sink=(n_sink, window) needs n_sink >= 0 and window >= 1, got {sink}")
    eos_ids = () if eos_id is None else (
        (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id))
    self.model, self.mesh = _serving_layout(model, unstack), mesh
    if mesh is not None:
      shard_model(self.model, mesh)
    self.max_new_tokens, self.max_len, self.sink = max_new_tokens, max_len, sink
    self.prefill_iterations, self.prefill_mode = prefill_iterations, prefill_mode
    # The cache's storage: a dtype, or "int8" / "fp8" (quantized, `lckv_jax.quant`).
    self.return_logits = return_logits
    self.cache_dtype = quant.cache_dtype(cache_dtype, cfg.compute_dtype)
    self.prefill_batch = prefill_batch
    self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
    self.prefill_widths = None if prefill_widths is None else int(prefill_widths)
    self.per_row_sampling, self.sampling = per_row_sampling, sampling
    self.settings = _Settings(sampling, eos_ids, pad_id, stream)
    self.vocab_size = cfg.vocab_size
    # A server's weights never change: split the model once. `nnx.split` walks the whole module
    # graph (5,000 nodes at 1b, milliseconds), and a server calls the model every few steps.
    self._split = nnx.split(self.model) if static_weights else None

  def _graph(self):
    """(graphdef, params) of the model: held with `static_weights`, else split now (weights a
    caller updated in place since are seen)."""
    return self._split if self._split is not None else nnx.split(self.model)

  def _cache_len(self, longest: int, padded: int) -> int:
    """Cache slots for prompts of up to `longest` tokens, left-padded to `padded` (the cache holds
    the padding too) and `max_new_tokens` each; raises when they do not fit."""
    what = f"prompt of {longest} tokens" + (f" (padded to {padded})" if padded > longest else "")
    if self.sink is not None:
      cap = self.sink[0] + self.sink[1]
      if padded > cap:
        raise ValueError(f"{what} is longer than the sink cache (n_sink + window = {cap}); "
                         "shorten it or enlarge the window")
      return cap
    need = padded + self.max_new_tokens - 1
    if self.max_len is None:
      return cache_lib.rounded_slots(need)
    if padded > self.max_len:
      raise ValueError(f"{what} is longer than the cache (max_len={self.max_len})")
    if need > self.max_len:
      raise ValueError(f"{what} + max_new_tokens={self.max_new_tokens} needs {need} cache slots, "
                       f"but max_len={self.max_len}; raise max_len or use sink=(n_sink, window)")
    return self.max_len

  def _check_positions(self, lengths: np.ndarray, budget: np.ndarray) -> None:
    """Every row's prompt and new tokens within max_position_embeddings (positions count per row
    from its first token; a sink cache bounds them by n_sink + window)."""
    limit = self.model.config.max_position_embeddings
    cap = None if self.sink is None else sum(self.sink)
    for r, (n, new) in enumerate(zip(lengths.tolist(), budget.tolist())):
      which = "prompt" if len(lengths) == 1 else f"prompt {r}"
      if n > limit:
        raise ValueError(f"{which} of {n} tokens exceeds max_position_embeddings={limit}")
      if cap is not None and min(n + new, cap) > limit:
        raise ValueError(f"sink={self.sink}: n_sink + window = {cap} positions exceeds "
                         f"max_position_embeddings={limit}; use a window <= {limit - self.sink[0]}")
      if cap is None and n + new > limit:
        raise ValueError(f"{which} of {n} tokens + max_new_tokens={new} = {n + new} positions "
                         f"exceeds max_position_embeddings={limit}; lower max_new_tokens or use "
                         "sink=(n_sink, window)")

  def start(self, prompts: Sequence[Sequence[int]], seed: int | jax.Array = 0,
            max_new_tokens: int | Sequence[int] | None = None,
            sampling: Sequence[Sampling] | None = None, seeds: Sequence[int] | None = None,
            pad_to: int | None = None) -> DecodeState:
    """Prefills left-padded prompts and samples each row's first token.

    `pad_to`: left-pad every prompt to this length (see `pad_prompts`; with `prefill_chunk`, then
    on to `chunked_length`). With `per_row_sampling`, each row samples with its own
    `sampling[r]` (default the Generator's) and `seeds[r]` (default seed + r); else `sampling`
    and `seeds` must be None.

    This is `begin`, `prefill_next` until the job is `done`, then `finish`: the calls a server
    makes one at a time between decode steps, so both give the same tokens.
    """
    job = self.begin(prompts, seed, max_new_tokens, sampling, seeds, pad_to)
    while not job.done:
      job = self.prefill_next(job)
    return self.finish(job)

  def begin(self, prompts: Sequence[Sequence[int]], seed: int | jax.Array = 0,
            max_new_tokens: int | Sequence[int] | None = None,
            sampling: Sequence[Sampling] | None = None, seeds: Sequence[int] | None = None,
            pad_to: int | None = None) -> PrefillJob:
    """The prefill of `prompts` as a `PrefillJob` (arguments as in `start`), nothing run yet.

    Host work only (padding and checks): whatever `start` would refuse (an empty prompt, an id
    outside the vocabulary, a prompt that does not fit the cache or the positions) raises here,
    before any chunk runs. With `prefill_chunk=C` the prompts are left-padded to
    `chunked_length` (a first chunk of `first_chunk_sizes`, then whole chunks), and the job
    has `ceil(padded / C)` chunks; without, one chunk: the whole padded prompt.
    """
    cfg = self.model.config
    if not self.per_row_sampling and (sampling is not None or seeds is not None):
      raise ValueError("start: sampling= and seeds= per row need Generator(per_row_sampling=True)")
    tokens, positions, segment_ids, lengths = pad_prompts(prompts, cfg.vocab_size,
                                                          self.settings.pad_id, pad_to)
    b, longest = tokens.shape
    chunk = longest
    if self.prefill_chunk is not None:
      # Every later chunk call is [batch, C]: the padding (segment 0, never attended) goes on the
      # left, into the first chunk, so that the prompt's last token ends the last chunk.
      chunk = self.prefill_chunk
      extra = chunked_length(longest, chunk, self.prefill_widths) - longest
      tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=self.settings.pad_id)
      positions = np.pad(positions, ((0, 0), (extra, 0)))
      segment_ids = np.pad(segment_ids, ((0, 0), (extra, 0)))
    self._cache_len(int(lengths.max()), tokens.shape[1])  # raises when it does not fit
    budget = np.broadcast_to(np.asarray(
        self.max_new_tokens if max_new_tokens is None else max_new_tokens, np.int32), (b,))
    if (budget < 1).any() or (budget > self.max_new_tokens).any():
      raise ValueError(f"max_new_tokens per row must be in 1..{self.max_new_tokens}, got {budget}")
    self._check_positions(lengths, budget)
    row_settings, row_seeds = self._row_settings(b, seed, sampling, seeds)
    return PrefillJob(tokens=tokens, positions=positions, segment_ids=segment_ids,
                      lengths=lengths, budget=np.array(budget), chunk=chunk, seed=seed,
                      sampling=row_settings, seeds=row_seeds)

  def prefill_next(self, job: PrefillJob) -> PrefillJob:
    """Runs the job's next chunk into its cache (created at the first); returns the new job.

    With `prefill_chunk=C`, chunk k covers `job.bounds(k)`: the first, of a width of
    `first_chunk_sizes`, in `Mode.PREFILL_EMPTY`, the later ones, [batch, C], in `Mode.PREFILL`
    after it. Every call has one of these shapes and modes, whatever the prompt's length, so
    nothing compiles after the first of each.
    """
    if job.done:
      raise ValueError(f"prefill_next: the job's {job.num_chunks} chunks are all prefilled; "
                       "call finish(job)")
    b, padded = job.tokens.shape
    cache = job.cache
    if cache is None:
      max_len = self._cache_len(int(job.lengths.max()), padded)
      if self.sink is not None:
        cache = KVCache.create_sink(self.model.config, b, *self.sink, dtype=self.cache_dtype)
      else:  # each row one sequence in contiguous slots: decode steps read only that span
        cache = _empty_cache(self.model.config, b, max_len, self.cache_dtype)
    if self.prefill_chunk is None:
      logits, cache = self._prefill_rows(job.tokens, job.positions, job.segment_ids, cache)
    else:
      logits, cache = self._prefill_chunk(job, cache)
    return dataclasses.replace(job, cache=cache, logits=logits, chunks_done=job.chunks_done + 1)

  def finish(self, job: PrefillJob) -> DecodeState:
    """Samples each row's first token from the prefilled job, as `start` does: a `DecodeState`
    to decode, or a row to `insert` into a running batch. The job's cache is handed on (not
    copied): the job is spent."""
    if not job.done:
      raise ValueError(f"finish: {job.num_chunks - job.chunks_done} of the job's "
                       f"{job.num_chunks} chunks are not prefilled yet (prefill_next)")
    b, padded = job.tokens.shape
    rows = None if job.sampling is None else row_arrays(job.sampling, job.seeds)
    from_seed = isinstance(job.seed, (int, np.integer))
    seed = np.uint32(job.seed % 2**32) if from_seed else job.seed
    vocab = self.model.config.vocab_size if self.return_logits else 0
    state = _started(self.settings, self.max_new_tokens, vocab, self.sink is not None, from_seed,
                     job.cache, job.logits, seed, job.lengths, job.budget,
                     np.full((b,), padded, np.int32), rows)
    return _shard_state(state, self.mesh)

  def free_rows(self, batch: int, seed: int = 0) -> DecodeState:
    """A decode state of `batch` rows that hold nothing (done, a budget of no tokens): the batch
    a server `insert`s requests into. Nothing runs on the model. (`start` on `batch`
    one-token prompts made it before, but with `prefill_chunk=C` that prefills [batch, C]
    tokens at once: at 7b and 205 rows, 6.4 GiB of attention scores on a 24 GB cap.)"""
    if self.sink is None and self.max_len is None:
      raise ValueError("free_rows needs a Generator with a fixed max_len (the cache length)")
    if batch < 1:
      raise ValueError(f"free_rows: batch must be >= 1, got {batch}")
    cfg = self.model.config
    if self.sink is not None:
      cache = KVCache.create_sink(cfg, batch, *self.sink, dtype=self.cache_dtype)
    else:
      cache = KVCache.create(cfg, batch, self.max_len, self.cache_dtype, contiguous=True)
    zeros = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731 - one buffer each: donated apart
    rows = None
    if self.per_row_sampling:
      rows = row_sampling([self.sampling] * batch, [(seed + r) % 2**32 for r in range(batch)])
    state = DecodeState(
        cache=cache, token=zeros(), write_index=zeros(), position=zeros(),
        done=jnp.ones((batch,), bool), num_generated=zeros(), max_new=zeros(),
        tokens=jnp.full((batch, self.max_new_tokens), self.settings.pad_id, jnp.int32),
        logits=(jnp.zeros((batch, self.max_new_tokens, cfg.vocab_size), jnp.float32)
                if self.return_logits else None),
        rng=jax.random.key(seed), rows=rows)
    return _shard_state(state, self.mesh)

  def _row_settings(self, b: int, seed, sampling, seeds
                    ) -> tuple[tuple[Sampling, ...] | None, tuple[int, ...] | None]:
    """Each row's sampling and seed, checked (`finish` makes the `RowSampling` of them)."""
    if not self.per_row_sampling:
      return None, None
    sampling = [self.sampling] * b if sampling is None else list(sampling)
    if seeds is None:
      if not isinstance(seed, int):
        raise ValueError("start: give seeds= (one int per row) with per_row_sampling and a key")
      seeds = [seed + r for r in range(b)]
    if len(sampling) != b or len(seeds) != b:
      raise ValueError(f"start: {b} prompts need {b} sampling settings and seeds, got "
                       f"{len(sampling)} and {len(seeds)}")
    for s in seeds:
      if not isinstance(s, (int, np.integer)) or not 0 <= s < 2**32:
        raise ValueError(f"start: a seed must be an integer in [0, 2**32), got {s!r}")
    return tuple(sampling), tuple(int(s) for s in seeds)

  def _inputs(self, tokens, positions, segment_ids) -> tuple:
    """A prefill call's host arrays: on a mesh, placed on it (`_shard_state` shards device
    arrays); on one device, left on the host for `prefill` to check and transfer (checking
    device arrays fetches each back: three waits a call)."""
    if self.mesh is None:
      return tokens, positions, segment_ids
    as_array = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return as_array(tokens), as_array(positions), as_array(segment_ids)

  def compile_prefill(self, job: PrefillJob, k: int) -> None:
    """Compiles chunk `k` of `job` (made by `begin`, with `prefill_chunk`) ahead of time, running
    nothing: a later `prefill_next` of its shape finds it compiled. Several threads may call
    it at once (XLA compiles outside the GIL): a server's warm-up compiles its dozens of call
    shapes side by side. Under a mesh it does nothing: the calls' inputs are placed there, and
    they compile when they first run."""
    if self.prefill_chunk is None or not 0 <= k < job.num_chunks:
      raise ValueError(f"compile_prefill: chunk {k} of a job of {job.num_chunks} chunks, with "
                       f"prefill_chunk={self.prefill_chunk}")
    if self.mesh is not None:
      return
    b, padded = job.tokens.shape
    cache = jax.eval_shape(functools.partial(
        _empty_cache, self.model.config, b, self._cache_len(int(job.lengths.max()), padded),
        self.cache_dtype))
    self._prefill_chunk(dataclasses.replace(job, chunks_done=k), cache, compile_only=True)

  def _prefill_chunk(self, job: PrefillJob, cache: KVCache, compile_only: bool = False):
    """Chunk `job.chunks_done` of every row into `cache` (`prefill_next` with `prefill_chunk`)."""
    b, k = job.tokens.shape[0], job.chunks_done
    start, end = job.bounds(k)
    tokens, positions, segment_ids = (a[:, start:end] for a in (job.tokens, job.positions,
                                                                job.segment_ids))
    # From slot 0 of an empty cache, the first chunk; the later ones after the slots the cache
    # holds. Positions count from each row's first real token, not from the slot, so they are
    # always given: the first chunk's rise by one within the prompt, so it takes the fused
    # kernel however it is padded (`prefill`), one compilation per width and batch size.
    mode = Mode.PREFILL_EMPTY if k == 0 else Mode.PREFILL
    write_index = None if k == 0 else np.full((b,), start, np.int32)
    arrays = _shard_state((*self._inputs(tokens, positions, segment_ids), cache), self.mesh)
    return prefill(self.model, *arrays, write_index, mode=mode,
                   iterations=self.prefill_iterations, prefill_mode=self.prefill_mode,
                   split=self._graph(), rule_chunk=job.chunk, compile_only=compile_only)

  def _prefill_rows(self, tokens, positions, segment_ids, cache):
    """Prefills the prompts whole, `prefill_batch` rows at a time. One chunk runs straight into the
    decode cache; several run each into a cache of the prompt's length, whose slots are then
    copied into the first slots of the decode cache: the prefill's activations and cache then
    take the memory of `prefill_batch` rows and the prompt's slots, not of the whole decode
    batch and its `max_len` slots."""
    cfg = self.model.config
    b, longest = tokens.shape
    step = b if self.prefill_batch is None else min(self.prefill_batch, b)
    unpadded = bool((segment_ids != 0).all())  # equal lengths: positions 0..T-1, one segment
    logits = []
    for r in range(0, b, step):
      n = min(step, b - r)
      # The sink cache has no rings: its prompt slots are copied as written, left-aligned after.
      sub = cache if n == b else KVCache.create(cfg, n, longest, self.cache_dtype,
                                                ring=self.sink is None, contiguous=True)
      rows = (None, None) if unpadded else (positions[r:r + n], segment_ids[r:r + n])
      arrays = _shard_state((*self._inputs(tokens[r:r + n], *rows), sub), self.mesh)
      out, sub = prefill(self.model, *arrays, mode=Mode.PREFILL_EMPTY,
                         iterations=self.prefill_iterations, prefill_mode=self.prefill_mode,
                         split=self._graph())
      logits.append(out)
      cache = sub if n == b else _put_rows(cache, sub, r)
    return (logits[0] if len(logits) == 1 else jnp.concatenate(logits)), cache

  def decode(self, state: DecodeState, num_steps: int | None = None) -> DecodeState:
    """Decodes up to `num_steps` tokens per row (default: until every row is done). `state` is
    donated: use the returned one."""
    num_steps = self.max_new_tokens if num_steps is None else num_steps
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
      raise ValueError(f"decode: num_steps must be an integer >= 0, got {num_steps!r}")
    graphdef, params = self._graph()
    state, _ = _decode(graphdef, self.settings, params, state, jnp.asarray(num_steps, jnp.int32))
    return state

  def compile_decode(self, state: DecodeState, num_steps: int = 1) -> None:
    """Compiles `decode` of `state`'s shapes ahead of time, running nothing (`state` is not
    donated; the step count is an argument of the loop, so any number of steps finds it)."""
    graphdef, params = self._graph()
    _decode.lower(graphdef, self.settings, params, state,
                  jnp.asarray(num_steps, jnp.int32)).compile()

  def insert(self, state: DecodeState, row: int, new: DecodeState, new_row: int = 0
             ) -> DecodeState:
    """`state` with batch row `row` replaced by row `new_row` of `new` (from `start`)."""
    b, nb = state.token.shape[0], new.token.shape[0]
    if not 0 <= row < b:
      raise ValueError(f"insert: row must be in 0..{b - 1}, got {row}")
    if not 0 <= new_row < nb:
      raise ValueError(f"insert: new_row must be in 0..{nb - 1}, got {new_row}")
    if self.sink is None and self.max_len is None:
      raise ValueError("insert needs a Generator with a fixed max_len (the cache length)")
    rows = [None] * nb  # `insert_rows` with every other row of `new` skipped
    rows[new_row] = row
    return self.insert_rows(state, rows, new)

  def insert_rows(self, state: DecodeState, rows: Sequence[int | None], new: DecodeState
                  ) -> DecodeState:
    """`state` with batch row `rows[i]` replaced by row i of `new` (a `finish`ed job of several
    prompts), in one call; a None skips row i of `new` (a request cancelled while prefilling)."""
    b, nb = state.token.shape[0], new.token.shape[0]
    if len(rows) != nb:
      raise ValueError(f"insert_rows: {nb} new rows need {nb} row indices, got {len(rows)}")
    taken = [r for r in rows if r is not None]
    if any(not 0 <= r < b for r in taken) or len(set(taken)) != len(taken):
      raise ValueError(f"insert_rows: rows must be distinct and in 0..{b - 1} (or None), got "
                       f"{list(rows)}")
    if self.sink is None and self.max_len is None:
      raise ValueError("insert_rows needs a Generator with a fixed max_len (the cache length)")
    # KVCache.insert_rows checks the two caches' layouts while `_insert_rows` traces. Rows
    # traced, not static: one compilation serves every row (a server inserts into all).
    index = jnp.asarray([b if r is None else r for r in rows], jnp.int32)  # b: dropped
    return _shard_state(_insert_rows(state, new, index), self.mesh)

  @staticmethod
  def results(state: DecodeState) -> list[list[int]]:
    """Generated tokens of each row (EOS included when sampled)."""
    tokens, counts = np.asarray(state.tokens), np.asarray(state.num_generated)
    return [tokens[r, :counts[r]].tolist() for r in range(tokens.shape[0])]


# ---------------------------------------------------------------------------------------------
# One call.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
  """What `generate` returns."""
  tokens: list[list[int]]  # new tokens of each prompt (EOS included when sampled)
  texts: list[str] | None  # decoded new tokens, for text prompts
  logits: np.ndarray | None  # [batch, max_new_tokens, vocab] with return_logits
  seconds: float  # wall time of prefill + decoding
  prefill_seconds: float  # wall time of the prefill (first token included)


def generate(model: Transformer, prompts, *, max_new_tokens: int = 32, tokenizer=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | Sequence[int] | None = None, max_len: int | None = None,
             prefill_iterations: int | None = None, prefill_mode: str = "auto",
             sink: tuple[int, int] | None = None, mesh: Mesh | None = None,
             return_logits: bool = False, stream: Callable | None = None,
             prefill_chunk: int | None = None, prefill_widths: int | None = None,
             cache_dtype=None) -> Generation:
  """Generates continuations of `prompts`: text (with `tokenizer`), token ids, or lists of them.

  Greedy by default; `temperature`, `top_k`, `top_p` and `seed` sample (same seed, same tokens).
  Stops a row at `eos_id` (default: the tokenizer's `eos_token_id`) or after `max_new_tokens`.
  `stream(tokens_B, active_B)` is called on the host with every new token of the batch.
  `prefill_chunk=C` prefills the prompts C tokens per call (`Generator`), as the server does,
  after a first chunk of one of `prefill_widths` widths (`first_chunk_sizes`).
  `cache_dtype`: the KV cache's storage (default the compute dtype; "int8" or "fp8" quantize it,
  `lckv_jax.quant`).
  """
  sampling = Sampling(temperature, top_k, top_p)
  token_lists, is_text = _as_token_lists(prompts, tokenizer)
  if eos_id is None and tokenizer is not None:
    eos_id = getattr(tokenizer, "eos_token_id", getattr(tokenizer, "eos_id", None))
  gen = Generator(model, max_new_tokens=max_new_tokens, max_len=max_len, sampling=sampling,
                  eos_id=eos_id, prefill_iterations=prefill_iterations,
                  prefill_mode=prefill_mode, sink=sink, return_logits=return_logits, mesh=mesh,
                  stream=stream, prefill_chunk=prefill_chunk, prefill_widths=prefill_widths,
                  cache_dtype=cache_dtype)
  t0 = time.perf_counter()
  state = gen.start(token_lists, seed)
  jax.block_until_ready(state.token)
  t1 = time.perf_counter()
  state = gen.decode(state)
  jax.block_until_ready(state.tokens)
  t2 = time.perf_counter()
  tokens = gen.results(state)
  texts = [tokenizer.decode(t) for t in tokens] if (is_text and tokenizer is not None) else None
  logits = None if state.logits is None else np.asarray(state.logits)
  return Generation(tokens, texts, logits, t2 - t0, t1 - t0)
