"""The training loop: sharded state, data, jitted steps, eval, metrics, checkpoints, signals."""

from __future__ import annotations

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
from lckv_jax.train import checkpointing, flops, optim, sharding, step as step_lib
from lckv_jax.train.config import check_resume, model_config, validate
from lckv_jax.train.metrics import MetricWriter


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
    micro = config.batch_size // config.grad_accum
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
                                   nnx.state(abstract, nnx.Param).to_pure_dict())
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    rep = sharding.replicated(self.mesh)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep)
    self.state_shardings = {"params": param_sh, "opt_state": opt_sh, "step": rep}
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"params": abstract_params, "opt_state": abstract_opt,
         "step": jax.ShapeDtypeStruct((), jnp.int32)}, self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    train_step = step_lib.make_train_step(self.model_config, self.tx, self.lr, config.z_loss,
                                          config.document_mask)
    self.train_step = jax.jit(train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.eval_step = jax.jit(step_lib.make_eval_step(self.model_config, config.document_mask),
                             in_shardings=(param_sh, self.batch_sharding), out_shardings=rep)
    self.is_main = jax.process_index() == 0
    self.write_metrics = write_metrics and self.is_main
    self.flops_per_token = flops.flops_per_token(self.model_config, config.seq_len)
    self.peak = flops.peak_flops_per_device(config.peak_tflops_per_device)
    self._stop_signal = None

  # -- state --------------------------------------------------------------------------------

  def init_state(self, init_from: str | None = None) -> dict:
    """Fresh state: random parameters, or those of a model checkpoint (`lckv_jax.checkpoint`)."""
    if init_from:
      from lckv_jax import checkpoint
      loaded = checkpoint.load_config(init_from)
      diff = {f: (getattr(loaded, f), getattr(self.model_config, f))
              for f in loaded.__dataclass_fields__
              if getattr(loaded, f) != getattr(self.model_config, f)}
      if diff:  # shapes must match (load_model checks); other fields follow the run's config
        logging.warning("init_from %s: config fields differ (checkpoint, run): %s", init_from, diff)
      model = checkpoint.load_model(init_from, **{
          f: getattr(self.model_config, f) for f in ("dtype", "forward_passes", "backward_passes")})
      params = nnx.state(model, nnx.Param).to_pure_dict()
      params = jax.device_put(params, self.state_shardings["params"])
    else:
      params = step_lib.init_params(self.model_config, self.config.seed,
                                    self.state_shardings["params"])
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}

  def device_batch(self, batch: dict, micro_batches: int | None = None) -> dict:
    """Host rows [batch, seq] -> global arrays [micro_batches, batch/micro_batches, seq]."""
    k = self.config.grad_accum if micro_batches is None else micro_batches
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
      out = jax.device_get(self.eval_step(params, self.device_batch(self.data.eval[i], 1)))
      nll += float(out["nll_sum"])
      count += float(out["tokens"])
    loss = nll / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}

  # -- the loop ------------------------------------------------------------------------------

  def _on_signal(self, signum, frame):
    if self._stop_signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self._stop_signal = signum
    logging.warning("signal %d: saving a checkpoint and stopping after this step", signum)

  def train(self, max_steps: int | None = None, init_from: str | None = None
            ) -> tuple[dict, list[dict]]:
    """Runs (or resumes) training to `config.steps` (or `max_steps`); returns (state, history)."""
    cfg = self.config
    ckpt = checkpointing.Checkpointer(self.workdir, cfg.checkpoint.keep)
    try:
      restored = ckpt.restore(self.abstract_state, lambda saved: check_resume(
          saved, cfg, f"the checkpoint in {ckpt.directory}"))
    except Exception:
      ckpt.close()
      raise
    if restored is None:
      state, start, data_state = self.init_state(init_from), 0, {"step": 0}
    else:
      start, state, data_state = restored
      logging.info("resumed from step %d of %s", start, ckpt.directory)
    it = StepIterator(self.data.train)
    it.set_state(data_state)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    writer = MetricWriter(self.workdir, self.write_metrics)
    history = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, self._on_signal)
    pbar = None
    if cfg.progress_bar and self.is_main:
      from tqdm import tqdm
      pbar = tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    n_dev = len(self.mesh.devices.flat)
    last_saved = start if restored is not None else -1
    t_last, steps_since = None, 0

    def save(step):
      nonlocal last_saved
      if step != last_saved:
        ckpt.save(step, state, it.get_state(), cfg.to_json())
        last_saved = step

    try:
      step = start
      while step < stop:
        batch = self.device_batch(next(it))
        state, metrics = self.train_step(state, batch)
        step += 1
        steps_since += 1
        if t_last is None:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          t_last, steps_since = time.perf_counter(), 0
        if step % cfg.log_every == 0 or step == stop:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
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
            pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m.get('tokens_per_s', 0):.0f}")
        if pbar is not None:
          pbar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != stop:
          ev = self.evaluate(state["params"])
          if ev:
            history.append({"step": step, **ev})
            writer.write(step, ev)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
          save(step)
        if self._stop_signal is not None:
          break
      if self._stop_signal is None and step == cfg.steps:
        ev = self.evaluate(state["params"])
        if ev:
          history.append({"step": step, **ev})
          writer.write(step, ev)
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
          saved, self.config, f"the checkpoint in {ckpt.directory}", model_only=True))
    finally:
      ckpt.close()
    return None if restored is None else (restored[0], restored[1]["params"])
