"""The training loop: sharded state, data, jitted steps, eval, metrics, checkpoints, signals."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lckv_jax.data.pipeline import StepIterator, make_datasets
from lckv_jax import flops, sharding
from lckv_jax.train import checkpointing, memory, optim, step as step_lib
from lckv_jax.cli import Diverged, UserError
from lckv_jax.train.config import check_resume, model_config, resolve_grad_accum, validate
from lckv_jax.train.workdir import WorkdirLock, check_writable_dir
from lckv_jax.train.metrics import MetricWriter


# Fields whose difference makes a checkpoint's parameters not fit (param_dtype does not: the
# parameters are cast as they load, e.g. a bfloat16 HuggingFace conversion into float32 training).
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "layer_types")


class Trainer:
  """Everything a run needs, built from a config; `train()` runs (and resumes) it."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None,
               write_metrics: bool = True):
    validate(config)
    self.config = config
    self.workdir = workdir
    self.model_config = model_config(config)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.grad_accum = resolve_grad_accum(config, batch_shards)
    micro = config.batch_size // self.grad_accum
    if micro % batch_shards:
      raise ValueError(f"micro-batch batch_size/grad_accum={micro} must be a multiple of "
                       f"mesh.data*mesh.fsdp={batch_shards}")
    self.data = make_datasets(config.data, config.seq_len,
                              config.batch_size // jax.process_count(),
                              self.model_config.vocab_size)
    self.tx, self.lr = optim.make_optimizer(config.optimizer, config.steps)

    abstract = step_lib.abstract_model(self.model_config)
    param_sh = sharding.param_shardings(nnx.state(abstract, nnx.Param), self.mesh)
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    rep = sharding.replicated(self.mesh)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep)
    self.state_shardings = {"params": param_sh, "opt_state": opt_sh, "step": rep}
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"params": abstract_params, "opt_state": abstract_opt,
         "step": jax.ShapeDtypeStruct((), jnp.int32)}, self.state_shardings)
    # What a train step needs per device, known before anything compiles; `train` refuses a
    # config that cannot fit (evaluation, which runs no train step, is not refused).
    self.memory = memory.estimate(config, self.model_config, self.mesh, self.grad_accum,
                                  self.abstract_state)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    train_step = step_lib.make_train_step(self.model_config, self.tx, self.lr, config.z_loss,
                                          config.document_mask)
    # Traced under the mesh, so that the model's activation constraints (`constrain`) apply.
    self.train_step = jax.jit(sharding.under_mesh(self.mesh, train_step),
                              in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, rep), donate_argnums=0)
    eval_step = step_lib.make_eval_step(self.model_config, config.document_mask)
    self.eval_step = jax.jit(sharding.under_mesh(self.mesh, eval_step),
                             in_shardings=(param_sh, self.batch_sharding), out_shardings=rep)
    self.is_main = jax.process_index() == 0
    self.write_metrics = write_metrics and self.is_main
    self.flops_per_token = flops.flops_per_token(self.model_config, config.seq_len)
    self.peak = flops.peak_flops_per_device(config.peak_tflops_per_device)
    self.stop_signal = None  # the signal that stopped the last train() (SIGTERM, SIGINT) or None
    self._compiled_step = None  # a Future of the compiled train step, made by the first train()

  def _compile_step(self):
    k = self.grad_accum
    batch = jax.ShapeDtypeStruct((k, self.config.batch_size // k, self.config.seq_len), jnp.int32,
                                 sharding=self.batch_sharding)
    names = ("tokens", "segment_ids", "positions")
    return self.train_step.lower(self.abstract_state, {n: batch for n in names}).compile()

  # -- state --------------------------------------------------------------------------------

  def init_state(self, init_from: str | None = None) -> dict:
    """Fresh state: random parameters, or those of a model checkpoint (`lckv_jax.checkpoint`)."""
    if init_from:
      from lckv_jax import checkpoint
      self._check_init_from(init_from)
      model = checkpoint.load_model(init_from, run=self.model_config.run,
                                    param_dtype=self.model_config.param_dtype)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      params = jax.device_put(params, self.state_shardings["params"])
    else:
      params = step_lib.init_params(self.model_config, self.config.seed,
                                    self.state_shardings["params"])
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}

  def _check_init_from(self, init_from: str) -> None:
    """Refuses a model checkpoint whose parameters have other shapes, naming the fields."""
    from lckv_jax import checkpoint
    loaded = checkpoint.load_config(init_from)
    diff = {f: (getattr(loaded, f), getattr(self.model_config, f))
            for f in loaded.__dataclass_fields__
            if getattr(loaded, f) != getattr(self.model_config, f)}
    shaped = {f: ab for f, ab in diff.items() if f in _SHAPE_FIELDS}
    if shaped:  # the parameters would not fit: name the fields and the flags that match
      raise UserError(
          f"--init_from={init_from} has other parameter shapes than config.model: "
          + ", ".join(f"{f}={a!r} (run: {b!r})" for f, (a, b) in sorted(shaped.items()))
          + "; to start from it pass " + " ".join(
              f"--config.model.{f}={a}" for f, (a, _) in sorted(shaped.items())))
    if diff:  # other fields (passes, dtype, kernels) follow the run's config
      logging.warning("init_from %s: config fields differ (checkpoint, run): %s", init_from, diff)

  def device_batch(self, batch: dict, micro_batches: int | None = None) -> dict:
    """Host rows [batch, seq] -> global arrays [micro_batches, batch/micro_batches, seq]."""
    k = self.grad_accum if micro_batches is None else micro_batches
    out = {}
    for name, x in batch.items():
      x = np.asarray(x, np.int32)
      local = x.reshape(k, x.shape[0] // k, x.shape[1])
      global_shape = (k, local.shape[1] * jax.process_count(), local.shape[2])
      out[name] = jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)
    return out

  # -- evaluation ----------------------------------------------------------------------------

  def evaluate(self, params) -> dict:
    """Held-out loss and perplexity (mean over predicted tokens)."""
    if self.data.eval is None:
      return {}
    nll, count = 0.0, 0.0
    for i in range(len(self.data.eval)):
      out = jax.device_get(self.eval_step(params, self.device_batch(self.data.eval[i])))
      nll += float(out["nll_sum"])
      count += float(out["tokens"])
    loss = nll / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}

  # -- the loop ------------------------------------------------------------------------------

  def _on_signal(self, signum, frame):
    if self.stop_signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.stop_signal = signum
    logging.warning("signal %d: saving a checkpoint and stopping after this step", signum)

  def train(self, max_steps: int | None = None, init_from: str | None = None
            ) -> tuple[dict, list[dict]]:
    """Runs (or resumes) training to `config.steps` (or `max_steps`); returns (state, history).

    Holds the workdir's lock throughout. Every step's loss, gradient norm and parameter norm
    are checked (one step behind, so the device never waits for the host): a non-finite one
    raises `Diverged` naming the step, before anything of that state is saved. After SIGTERM or
    SIGINT it saves, stops and leaves the signal in `self.stop_signal`.
    """
    self.workdir = check_writable_dir(self.workdir)
    lock = WorkdirLock(self.workdir) if self.is_main else contextlib.nullcontext()
    with lock:
      return self._train(max_steps, init_from)

  def _train(self, max_steps, init_from):
    cfg = self.config
    self.stop_signal = None
    # In seconds, naming the flags that fit, rather than by XLA's raw RESOURCE_EXHAUSTED after
    # minutes of compiling; before the state is made or restored.
    available = memory.device_memory(memory.local_device(self.mesh))
    memory.check(self.memory, *available, cfg, self.model_config, self.mesh)
    if self._compiled_step is None:  # train.py prints it on its model line
      logging.debug("memory: the train step needs an estimated %s; the device has %s",
                    self.memory.describe(), memory.describe_available(*available))
    if init_from and not checkpointing.has_steps(self.workdir):
      self._check_init_from(init_from)  # before anything is written, or compiled in background
    ckpt = checkpointing.Checkpointer(self.workdir, cfg.checkpoint.keep)
    try:
      restored = ckpt.restore(self.abstract_state, lambda saved: check_resume(
          saved, cfg, f"the checkpoint in {ckpt.directory}"))
      if self._compiled_step is None:
        # Compiled in the background while the parameters are made: the first step of
        # configs/1b.py on an H200 comes 9 s sooner (XLA compiles without holding the GIL).
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self._compiled_step = pool.submit(self._compile_step)
        pool.shutdown(wait=False)  # the compile runs on; the pool takes nothing more
      if restored is None:
        state, start, data_state = self.init_state(init_from), 0, {"step": 0}
      else:
        start, state, data_state = restored
        logging.info("resumed from step %d of %s", start, ckpt.directory)
    except BaseException:
      ckpt.close()
      raise
    it = StepIterator(self.data.train)
    it.set_state(data_state)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    writer = MetricWriter(self.workdir, self.write_metrics, resume_step=start)
    history = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, self._on_signal)
    pbar = None
    if cfg.progress_bar and self.is_main and start < stop:
      from tqdm import tqdm
      pbar = tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True, unit="step")
      pbar.set_postfix_str("compiling the train step" if start == 0 else "resuming")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    n_dev = len(self.mesh.devices.flat)
    last_saved = start if restored is not None else -1
    t_last, steps_since = None, 0
    unchecked = None  # (step, metrics on the device) of the newest step not yet checked

    def check(pending):
      """Host values of a step's metrics; raises Diverged if any is not finite."""
      n, metrics = pending
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = {k: m[k] for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])}
      if bad:
        newest = last_saved if last_saved > 0 else None
        raise Diverged(
            f"training diverged at step {n}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" (learning rate {m['lr']:.3g}); nothing of this state was saved; "
            + (f"the newest checkpoint (step {newest}) is finite and a rerun resumes from it"
               if newest else "no checkpoint was written yet")
            + ". Lower config.optimizer.lr, lengthen the warm-up or clip harder "
              "(config.optimizer.clip_norm)")
      return m

    def save(n):
      nonlocal last_saved, unchecked
      if unchecked is not None:  # the state about to be saved must be finite
        check(unchecked)
        unchecked = None
      if n != last_saved:
        ckpt.save(n, state, it.get_state(), cfg.to_json())
        last_saved = n

    def evaluate(n):
      ev = self.evaluate(state["params"])
      if ev:
        history.append({"step": n, **ev})
        writer.write(n, ev)
        if pbar is not None:
          pbar.write(f"step {n}: eval_loss {ev['eval_loss']:.4f}, eval_ppl {ev['eval_ppl']:.2f}")

    try:
      train_step = self._compiled_step.result() if start < stop else None
      if train_step is not None:  # XLA's own count, before the first step allocates it
        memory.check_compiled(train_step, *available, self.memory, cfg, self.model_config,
                              self.mesh)
      step = start
      while step < stop:
        batch = self.device_batch(next(it))
        state, metrics = train_step(state, batch)
        step += 1
        steps_since += 1
        if unchecked is not None:
          check(unchecked)
        unchecked = (step, metrics)
        if t_last is None:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          t_last, steps_since = time.perf_counter(), 0
          if pbar is not None:
            pbar.set_postfix_str("first step done")
        if step % cfg.log_every == 0 or step == stop:
          m = check(unchecked)
          unchecked = None
          now = time.perf_counter()
          if steps_since:
            tps = tokens_per_step * steps_since / (now - t_last)
            m["tokens_per_s"] = tps
            if self.peak:
              m["mfu"] = tps * self.flops_per_token / (self.peak * n_dev)
          t_last, steps_since = now, 0
          history.append({"step": step, **m})
          writer.write(step, m)
          if pbar is not None:
            pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m.get('tokens_per_s', 0):,.0f}")
        if pbar is not None:
          pbar.update(1)
        do_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != stop
        do_save = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0
        if do_eval or do_save:
          # tokens_per_s measures training: the time of evals and saves is left out of it.
          jax.block_until_ready(state)
          t_pause = time.perf_counter()
          if do_eval:
            evaluate(step)
          if do_save:
            save(step)
          if t_last is not None:
            t_last += time.perf_counter() - t_pause
        if self.stop_signal is not None:
          break
      if self.stop_signal is None and step == cfg.steps and step > start:
        evaluate(step)
      save(step)
    finally:
      ckpt.close()
      writer.close()
      if pbar is not None:
        pbar.close()
      for sig, h in handlers.items():
        signal.signal(sig, h)
    return state, history

  def restore_params(self):
    """Parameters of the newest readable checkpoint in the workdir, or None."""
    ckpt = checkpointing.Checkpointer(self.workdir, self.config.checkpoint.keep)
    try:
      restored = ckpt.restore(self.abstract_state, lambda saved: check_resume(
          saved, self.config, f"the checkpoint in {ckpt.directory}", model_only=True),
          move_damaged=False)
    finally:
      ckpt.close()
    return None if restored is None else (restored[0], restored[1]["params"])
