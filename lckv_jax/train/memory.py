"""The memory of a train step on one device, estimated before compiling, and the checks that
refuse a config that cannot fit, naming the flags that would.

Parameters and optimizer state are exact: the bytes of this device's shard of every leaf of the
abstract state. Gradients are the parameters' size once (one micro-batch), twice with
micro-batches (`step.py`'s scan keeps an accumulation buffer beside the micro-batch's gradients).
Activations are a formula per micro-batch (`activation_bytes`), fitted to XLA's
`memory_analysis()` of compiled steps on a CPU and a GPU (docs/training.md) and taken low, so
that the check before compiling does not refuse a run that fits; `check_compiled` then compares
XLA's own count of the compiled step, before the first step allocates it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import ml_collections

from lckv_jax import layer_types as lt_lib
from lckv_jax.cli import UserError
from lckv_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes that one device holds at the peak of a train step (the backward pass)."""
  params: int  # this device's parameter shards
  opt_state: int  # this device's optimizer-state shards
  grads: int  # gradients: one copy, or two with micro-batches (accumulator + current)
  activations: int  # what one micro-batch's forward keeps for its backward, plus the working set
  rows: int  # micro-batch rows per device
  grad_accum: int  # micro-batches per step
  seq_len: int  # tokens per row
  remat: str  # model.remat the activations were estimated for

  @property
  def total(self) -> int:
    return self.params + self.opt_state + self.grads + self.activations

  def describe(self) -> str:
    """'56.7 GB per device (parameters 4.3 GB, optimizer state ..., remat=dots)'."""
    return (f"{_gb(self.total)} per device (parameters {_gb(self.params)}, optimizer state "
            f"{_gb(self.opt_state)}, gradients {_gb(self.grads)}, activations "
            f"{_gb(self.activations)} for {self.rows} rows x {self.seq_len:,} tokens, "
            f"remat={self.remat})")


def _gb(n: float) -> str:
  return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e9:.3f} GB"


# -- the estimate -------------------------------------------------------------------------------


def shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs (with shardings) or arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def _abstract_state(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh) -> dict:
  """{'params', 'opt_state'} as ShapeDtypeStructs with shardings, as `Trainer` builds them."""
  import optax
  from flax import nnx
  from lckv_jax import sharding
  from lckv_jax.train import optim, step as step_lib
  tx, _ = optim.make_optimizer(config.optimizer, config.steps)
  abstract = nnx.state(step_lib.abstract_model(model_config), nnx.Param)
  param_sh = sharding.param_shardings(abstract, mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(abstract))
  opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  with_sh = lambda t, s: jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
  return {"params": with_sh(params, param_sh), "opt_state": with_sh(opt, opt_sh)}


def materialises_scores(model_config: ModelConfig, backend: str | None = None) -> bool:
  """Whether training attention builds the [T, T] scores of every head (XLA's dense softmax).

  The kernel the attention dispatch picks for training chunks: cuDNN on a GPU in bf16/fp16 and
  splash on a TPU do not; the dense path (CPU, a GPU in float32) and jax's 'xla' implementation do.
  """
  from lckv_jax.kernels import dispatch
  impl = dispatch.resolve_attention_impl(model_config.attention_impl, model_config.dtype,
                                         backend or jax.default_backend())
  return impl in ("dense", "xla")


# What one layer pass with gradients keeps for its backward, in elements per token, by remat
# policy. d: hidden, q: heads*head_dim, kv: kv_heads*head_dim (layers that compute KV), f: mlp
# width, s: heads*T attention scores (float32, only where they are materialised). Counted from
# what each policy saves (model.py), then fitted to XLA's CPU buffer sizes (docs/training.md):
#   none: the norms' inputs and outputs, q before and after RoPE, the attention output, k and v,
#     SwiGLU's gate, up, sigmoid, silu and product; three copies of the scores (exp, the masked
#     exp, the probabilities);
#   dots: every matmul output (q, k, v, attention output, o, gate, up) and the block input,
#     0.95 of a copy each; one copy of the scores (their einsum is a matmul with batch dims);
#   dots_no_batch: the same without the two attention einsums;
#   full: the block input only; the backward recomputes one block at a time.
_SAVED = {
    "none": dict(d=5.5, q=4.0, kv=3.0, f=5.0, s=3.0),
    "dots": dict(d=1.9, q=1.9, kv=1.9, f=1.9, s=1.0),
    "dots_no_batch": dict(d=1.85, q=0.9, kv=1.85, f=1.85, s=0.0),
    "full": dict(d=1.0, q=0.0, kv=0.0, f=0.0, s=0.0),
}
# A layer attending upward in a cyclic group of one backward pass reads KV that carries no
# gradient (the passes without gradients made it): no dK, dV, so neither the probabilities nor q
# are kept for them, and its backward works on one copy of the scores fewer. With b > 1 passes
# the KV of the pass before carries gradients, and the scan's body is the same for every pass.
_UPWARD_NONE = dict(_SAVED["none"], q=2.0, s=2.0)
# A layer run outside any scan (a run of one block, scan_layers=False) is not rematerialised:
# with prevent_cse=False XLA merges the recomputation with the forward pass. Its residuals are
# the 'none' set, of which XLA's fusions keep a little less.
_UNSCANNED = 0.9
# The working set of the backward pass of one scanned block, as (layer sets of 'none' linear
# elements, copies of the scores): the gradients of what the policy saved, and what it recomputes
# (dots_no_batch recomputes the softmax: its three copies and their two gradients).
_BACKWARD = {"none": (1.0, 2.0), "dots": (1.1, 1.5), "dots_no_batch": (0.6, 4.0),
             "full": (1.3, 3.0)}
# The formula matches XLA's counts within about 10% either way; the estimate takes 90% of it,
# so that it errs low: a run it lets through may still be refused by `check_compiled` (exact),
# but a run that fits is not refused before compiling.
_MARGIN = 0.9
# Bytes per element of the logits [rows, T, vocab] alive at once: on a CPU 2.5 float32 copies
# (the model's output, the loss's shifted copy and exp, their gradient); on a GPU XLA fuses the
# loss into fewer: the compute-dtype output and 0.8 of a float32 copy (5.2 bytes in bfloat16).
_LOGITS_CPU = 10.0
_LOGITS_F32 = 0.8


def _widths(model_config: ModelConfig, computes_kv: bool, seq_len: int, tensor: int,
            dense: bool) -> dict[str, int]:
  """The widths `_SAVED` weighs, per token of one layer on one device."""
  c = model_config
  split = lambda n: n // tensor if n % tensor == 0 else n  # tensor-sharded widths (RULES)
  hd, heads = c.resolved_head_dim, split(c.num_heads)
  return {"d": c.hidden_size, "q": heads * hd, "f": split(c.intermediate_size),
          "kv": split(c.num_kv_heads) * hd if computes_kv else 0,
          "s": heads * seq_len if dense else 0}


def _elems(weights: dict[str, float], widths: dict[str, int]) -> tuple[float, float]:
  """(linear, score) elements per token: the weighted widths, the scores apart (float32)."""
  linear = sum(weights[k] * widths[k] for k in ("d", "q", "kv", "f"))
  return linear, weights["s"] * widths["s"]


def _segments(model_config: ModelConfig):
  """(passes with gradients, [(inside a scan, its own scan, period, layers) of each scan run])
  of every segment of the iteration plan, as `model.Transformer` runs them."""
  lt = model_config.layer_spec
  out = []
  for seg in lt.plan():
    passes = model_config.backward_passes if seg.cyclic else 1
    # b > 1 passes of a cyclic group are a lax.scan (model._cyclic_group); one is unrolled.
    out.append((passes, [(run.num_blocks > 1 or passes > 1, run.num_blocks > 1, run.period,
                          range(run.start, run.end))
                         for run in lt_lib.scan_runs(lt, seg, model_config.scan_layers)]))
  return out


def activation_bytes(model_config: ModelConfig, rows: int, seq_len: int, *, tensor: int = 1,
                     backend: str | None = None, remat: str | None = None) -> int:
  """Bytes one device needs for the activations of a micro-batch of `rows` x `seq_len` tokens.

  Layers of a cyclic group count `backward_passes` times (the passes without gradients keep
  nothing); the backward of their scan over passes copies one pass's residuals of the inner scans
  (runs of several blocks) out of the stack. The peak is where the backward pass starts (every
  residual and the logits' gradient) or where it works on a scanned block (the residuals of that
  block and those below it; the layers above are done). XLA's CPU backend computes bfloat16 in
  float32 buffers, so there every activation counts 4 bytes.
  """
  c = model_config
  remat = remat or c.remat
  backend = backend or jax.default_backend()
  dense = materialises_scores(c, backend)
  act = 4 if backend == "cpu" else jax.numpy.dtype(c.compute_dtype).itemsize
  tokens = rows * seq_len
  lt = c.layer_spec
  saved, peak = 0.0, 0.0  # residuals of the layers so far; the largest backward working point
  for passes, runs in _segments(c):
    # This segment's residuals of one pass, those of its inner scans, its largest block's work.
    one_pass, inner, work = 0.0, 0.0, 0.0
    for scanned, stacked, period, layers in runs:
      run_saved = 0.0
      widths = [_widths(c, lt.computes_kv[i], seq_len, tensor, dense) for i in layers]
      upward = [lt.attends_top[i] and passes == 1 for i in layers]  # reads KV without gradient
      for w, up in zip(widths, upward):
        policy = remat if scanned else "none"
        keep = _UPWARD_NONE if policy == "none" and up else _SAVED[policy]
        linear, scores = _elems(keep, w)
        run_saved += (linear * act + scores * 4) * (1.0 if scanned else _UNSCANNED) * tokens
      one_pass += run_saved
      inner += run_saved if stacked else 0.0
      if scanned:  # the backward of one block (`period` layers) works beside the residuals
        lin_w, score_w = _BACKWARD[remat]
        block = sum(lin_w * _elems(_SAVED["none"], w)[0] * act
                    + (score_w - up) * w["s"] * 4 for w, up in zip(widths[:period], upward))
        # Within a segment of one pass, the runs above this one are done by now.
        work = max(work, block * tokens + (0.0 if passes > 1 else one_pass))
    if passes > 1:
      peak = max(peak, saved + passes * one_pass + inner + work)
    elif work:
      peak = max(peak, saved + work)
    saved += passes * one_pass
  vocab = c.vocab_size // tensor if c.vocab_size % tensor == 0 else c.vocab_size
  logits = tokens * vocab * (_LOGITS_CPU if backend == "cpu" else act + _LOGITS_F32 * 4)
  masks = 0
  if dense:  # one [rows, T, T] boolean mask per (masked diagonal, window) of the layers
    masks = len(set(zip(lt.diag_masked, lt.sliding))) * rows * seq_len * seq_len
  return int(_MARGIN * (max(peak, saved + logits) + masks))


def _grads(params: int, grad_accum: int) -> int:
  return params * (2 if grad_accum > 1 else 1)


def estimate(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh,
             grad_accum: int, abstract_state: dict | None = None,
             backend: str | None = None) -> Estimate:
  """Per-device bytes of a train step of `config` on `mesh` with `grad_accum` micro-batches.

  `abstract_state`: {'params', 'opt_state', ...} ShapeDtypeStructs with shardings (the
  trainer's `abstract_state`); built from the config when not given. Nothing is compiled or
  allocated. `backend` (default: JAX's) decides which attention kernel runs and how wide XLA
  makes bfloat16 activations.
  """
  if abstract_state is None:
    abstract_state = _abstract_state(config, model_config, mesh)
  params = shard_bytes(abstract_state["params"])
  opt_state = shard_bytes(abstract_state["opt_state"])
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = config.batch_size // grad_accum // shards
  return Estimate(
      params=params, opt_state=opt_state, grads=_grads(params, grad_accum),
      activations=activation_bytes(model_config, rows, config.seq_len,
                                   tensor=mesh.shape["tensor"], backend=backend),
      rows=rows, grad_accum=grad_accum, seq_len=config.seq_len, remat=model_config.remat)


# -- the device's memory ------------------------------------------------------------------------


def _host_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:  # other Unixes: free pages
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def local_device(mesh):
  """The first device of `mesh` that this process drives (the one whose memory it can read)."""
  return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def describe_available(available: int | None, what: str) -> str:
  return f"{_gb(available)} ({what})" if available is not None else what


def device_memory(device) -> tuple[int | None, str]:
  """(bytes a train step may use on `device`, where the number comes from); None if unknown.

  A GPU or TPU reports its allocator's limit. CPU devices share the host's RAM: what the kernel
  calls available (MemAvailable), split over the local CPU devices.
  """
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.platform.upper()} allocator limit"
  if device.platform != "cpu":
    return None, f"{device.platform} reports no memory limit"
  n = len(jax.local_devices(backend="cpu"))
  available = _host_available()
  if available is None:
    return None, "available host RAM unknown"
  return available // n, f"available host RAM / {n} CPU device{'s' if n > 1 else ''}"


# -- the checks ---------------------------------------------------------------------------------


def _with(est: Estimate, config, model_config: ModelConfig, mesh, cap: int | None,
          remat: str, backend) -> Estimate | None:
  """The estimate with at most `cap` rows per device (grad_accum=0) and `remat`; None when the
  batch does not split so."""
  from lckv_jax.train.config import resolve_grad_accum
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  k = est.grad_accum
  if cap is not None:
    trial = ml_collections.ConfigDict(
        {"grad_accum": 0, "micro_batch_per_device": cap, "batch_size": config.batch_size})
    try:
      k = resolve_grad_accum(trial, shards)
    except ValueError:
      return None
  rows = config.batch_size // k // shards
  return dataclasses.replace(
      est, grads=_grads(est.params, k), rows=rows, grad_accum=k, remat=remat,
      activations=activation_bytes(model_config, rows, est.seq_len, tensor=mesh.shape["tensor"],
                                   backend=backend, remat=remat))


def _advice(est: Estimate, available: int, config, model_config: ModelConfig, mesh,
            backend, scale: float = 1.0) -> str:
  """The flags that fit by the estimate (times `scale`), or why none does."""
  fits = lambda e: e is not None and e.total * scale <= available
  # Halving the rows: 8 -> 4, 2, 1.
  caps = [est.rows >> i for i in range(1, est.rows.bit_length())]

  def fewer_rows(remat):
    for cap in caps:
      e = _with(est, config, model_config, mesh, cap, remat, backend)
      if fits(e):
        return f"--config.grad_accum=0 --config.micro_batch_per_device={cap}", e
    return None

  options = [fewer_rows(model_config.remat)]
  if model_config.remat != "full":
    full = _with(est, config, model_config, mesh, None, "full", backend)
    if fits(full):
      options.append(("--config.model.remat=full", full))
    elif options[0] is None and (both := fewer_rows("full")):
      options.append((both[0] + " --config.model.remat=full", both[1]))
  options = [o for o in options if o is not None]
  if options:
    return "it fits with " + ", or ".join(
        f"{flags} (estimated {_gb(e.total * scale)})" for flags, e in options)
  state = (est.params * 2 + est.opt_state) * scale  # at one micro-batch: one gradient copy
  if state > available:
    devices, tensor = math.prod(mesh.shape.values()), mesh.shape["tensor"]
    if devices // tensor > mesh.shape["fsdp"]:
      data = " --config.mesh.data=1" if config.mesh.data not in (-1, 1) else ""
      more = (f"shard them over the {devices} devices with{data} "
              f"--config.mesh.fsdp={devices // tensor}, or use a smaller model")
    else:
      more = "use more devices (--config.mesh.fsdp) or a smaller model"
    return f"the parameters, optimizer state and gradients alone need {_gb(state)}: {more}"
  one = _with(est, config, model_config, mesh, 1, "full", backend)
  why = ""
  if materialises_scores(model_config, backend):
    why = (f"; attention_impl={model_config.attention_impl!r} on "
           f"{backend or jax.default_backend()} builds the {est.seq_len:,} x {est.seq_len:,} "
           "scores of every head")
  return (f"even 1 row per device with remat=full needs an estimated "
          f"{_gb(one.total * scale) if one else 'more'}{why}: shorten config.seq_len, or use a "
          "smaller model or more devices")


def check(est: Estimate, available: int | None, what: str, config: ml_collections.ConfigDict,
          model_config: ModelConfig, mesh, backend: str | None = None) -> None:
  """Raises UserError when `est` exceeds the `available` bytes, naming the flags that fit."""
  if available is None or est.total <= available:
    return
  raise UserError(
      f"the train step of config.batch_size={config.batch_size} in {est.grad_accum} "
      f"micro-batch(es) needs an estimated {est.describe()}, more than the device's "
      f"{_gb(available)} ({what}); "
      + _advice(est, available, config, model_config, mesh, backend))


def compiled_bytes(compiled) -> tuple[int, str] | None:
  """(bytes, breakdown) that XLA's compiled step needs per device, or None if it cannot say."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - unimplemented on some backends
    return None
  if ma is None:
    return None
  arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  need = arg + out - alias + temp
  return need, (f"arguments {_gb(arg)} + outputs {_gb(out)} - donated {_gb(alias)} + "
                f"temporaries {_gb(temp)}")


def check_compiled(compiled, available: int | None, what: str, est: Estimate,
                   config: ml_collections.ConfigDict, model_config: ModelConfig, mesh,
                   backend: str | None = None) -> None:
  """After compiling: raises UserError when XLA's own count exceeds `available`, before the
  first step allocates it. The flags offered are the estimate's, scaled to XLA's count."""
  got = compiled_bytes(compiled)
  if available is None or got is None or got[0] <= available:
    return
  need, parts = got
  scale = need / max(est.total, 1)
  raise UserError(
      f"the compiled train step of config.batch_size={config.batch_size} in {est.grad_accum} "
      f"micro-batch(es) of {est.rows} rows per device needs {_gb(need)} per device ({parts}; "
      f"estimated before compiling: {_gb(est.total)}), more than the device's {_gb(available)} "
      f"({what}); " + _advice(est, available, config, model_config, mesh, backend, scale))
