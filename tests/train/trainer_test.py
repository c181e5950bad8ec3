import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax.data import pipeline
from lckv_jax.train import optim, step as step_lib
from lckv_jax.train.config import default_config, from_file, model_config
from lckv_jax.train.trainer import Trainer
from tests import ROOT, tiny


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  return Trainer(tiny.tiny_train_config(), str(tmp_path_factory.mktemp("train")))


def test_tiny_model_learns(trainer, tmp_path):
  trainer.workdir = str(tmp_path / "learn")
  _, history = trainer.train()
  losses = [h["loss"] for h in history if "loss" in h]
  assert losses[-1] < losses[0] - 1.5, losses
  evals = [h for h in history if "eval_loss" in h]
  assert evals and np.isfinite(evals[-1]["eval_ppl"])
  assert os.path.exists(os.path.join(trainer.workdir, "metrics.jsonl"))
  assert os.listdir(os.path.join(trainer.workdir, "tensorboard"))


def test_resume_equals_straight_run_and_corrupt_checkpoint_is_skipped(trainer, tmp_path, caplog):
  trainer.workdir = str(tmp_path / "straight")
  straight, _ = trainer.train(max_steps=20)
  trainer.workdir = str(tmp_path / "resumed")
  trainer.train(max_steps=10)
  resumed, _ = trainer.train(max_steps=20)
  assert int(resumed["step"]) == 20
  chex.assert_trees_all_close(resumed["params"], straight["params"], atol=1e-6, rtol=0)
  chex.assert_trees_all_close(resumed["opt_state"], straight["opt_state"], atol=1e-6, rtol=0)
  # Corrupt the newest step: restoring falls back to the one before, with a warning.
  import shutil
  shutil.rmtree(os.path.join(trainer.workdir, "checkpoints", "20", "state"))
  step, _ = trainer.restore_params()
  assert step == 10
  assert "unreadable" in caplog.text


def test_grad_accumulation_equals_one_big_batch(tiny_train_config):
  c = tiny_train_config()
  c.model.update(num_layers=2, layer_types="cla")  # accumulation does not depend on the plan
  mc = model_config(c)
  tx, lr = optim.make_optimizer(c.optimizer, c.steps)
  ds = pipeline.make_datasets(c.data, c.seq_len, c.batch_size, mc.vocab_size)
  batch = ds.train[0]
  params = step_lib.init_params(mc, 0)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  fn = jax.jit(step_lib.make_train_step(mc, tx, lr))
  out = {}
  for k in (1, 4):
    b = {n: jnp.asarray(x).reshape(k, -1, x.shape[-1]) for n, x in batch.items()}
    out[k] = fn(state, b)
  np.testing.assert_allclose(out[1][1]["loss"], out[4][1]["loss"], rtol=1e-6)
  chex.assert_trees_all_close(out[1][0]["params"], out[4][0]["params"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("override,message", [
    ({"data.source": "files", "data.path": "/nonexistent/x.txt"}, "matches no file"),
    ({"data.source": "files", "data.path": "EMPTY"}, "is empty"),
    ({"model.vocab_size": 100}, "has 256 tokens but model.vocab_size=100"),
    ({"mesh.data": 3}, r"mesh shape \(mesh.data=3, .* but there are 1"),
    ({"model.layer_types": "garbage"}, "layer_types='garbage' is invalid"),
])
def test_bad_inputs_stop_with_one_clear_message(override, message, tmp_path, tiny_train_config):
  c = tiny_train_config()
  for key, value in override.items():
    if value == "EMPTY":
      (tmp_path / "empty.txt").write_text("")
      value = str(tmp_path / "empty.txt")
    section, field = key.split(".")
    c[section][field] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    Trainer(c, str(tmp_path / "wd"))


def test_train_py_reports_a_bad_config_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       "--config.model.layer_types=garbage"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.startswith("train.py: error:")]
  assert len(err) == 1 and "layer_types='garbage'" in err[0]
  assert "Traceback" not in out.stderr


def test_every_config_field_has_its_meaning_and_show_config_prints_them():
  from lckv_jax.train.config import describe, field_help
  helps = field_help()
  c = default_config()
  fields = [f"{s}.{k}" for s, v in c.items() if hasattr(v, "keys") for k in v] + [
      k for k, v in c.items() if not hasattr(v, "keys")]
  assert sorted(f for f in fields if not helps.get(f)) == []
  assert helps["model.forward_passes"].startswith("m: iterations")
  assert "shipped" in helps["data.tokenizer"]  # a comment continued on the next line
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", "--config.optimizer.lr=0.0123",
       "--show_config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == len(fields)
  lr = next(l for l in lines if l.startswith("--config.optimizer.lr="))
  assert lr.split()[0] == "--config.optimizer.lr=0.0123" and lr.endswith("# peak learning rate")
  expected = from_file(os.path.join(ROOT, "configs", "tiny.py"))
  expected.optimizer.lr = 0.0123
  assert out.stdout.strip() == describe(expected)


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


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  import signal
  import time
  args = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
          "--config.model.hidden_size=32", "--config.model.num_heads=4",
          "--config.model.intermediate_size=64", "--config.model.layer_types=cla",
          "--config.steps=100000", "--config.log_every=1", "--config.data.max_documents=20",
          "--config.checkpoint.every=0", "--config.progress_bar=False"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 150
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  assert proc.returncode == 75  # EX_TEMPFAIL: preempted, requeue
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert steps and steps[0] >= 2


def test_resume_compares_the_saved_config(trainer, tmp_path, caplog, tiny_train_config):
  from lckv_jax.train import checkpointing
  trainer.workdir = str(tmp_path / "wd")
  ckpt = checkpointing.Checkpointer(trainer.workdir)
  state = jax.tree.map(lambda x: jnp.full(x.shape, 2, x.dtype, device=x.sharding),
                       trainer.abstract_state)  # values do not matter here: skip compiling init
  ckpt.save(2, state, {"step": 2}, trainer.config.to_json())
  ckpt.close()
  # A changed field of what the model is is an error naming it, even one that keeps the
  # parameter shapes.
  c = tiny_train_config()
  c.model.rope_theta = 500.0
  with pytest.raises(ValueError, match=r"config.model.rope_theta=500.0 but the checkpoint .* "
                                       r"trained with model.rope_theta=10000.0"):
    Trainer(c, trainer.workdir).train(max_steps=2)
  # How it runs may change (here the iteration plan's passes): one warning, and it resumes.
  c = tiny_train_config()
  c.model.forward_passes = 2
  caplog.clear()
  state, _ = Trainer(c, trainer.workdir).train(max_steps=2)
  assert int(state["step"]) == 2 and "model.forward_passes: 1 -> 2" in caplog.text
  # A changed schedule length warns with both values, and the run resumes.
  caplog.clear()
  state, _ = Trainer(tiny_train_config(steps=80), trainer.workdir).train(max_steps=2)
  assert int(state["step"]) == 2
  assert "config.steps changed from 50" in caplog.text and "to 80" in caplog.text


def test_document_mask_off_runs_the_packed_row_as_one_causal_sequence(tiny_train_config):
  c = tiny_train_config()
  mc = model_config(c)
  params = step_lib.init_params(mc, 0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  segments = jnp.asarray([[1] * 6 + [2] * 10] * 2)
  positions = jnp.asarray([list(range(6)) + list(range(10))] * 2)
  masked = step_lib.model_apply_fn(mc)(params, tokens, positions, segments)
  row = step_lib.model_apply_fn(mc, document_mask=False)(params, tokens, positions, segments)
  plain = step_lib.model_apply_fn(mc)(params, tokens, jnp.arange(16)[None].repeat(2, 0),
                                      jnp.ones_like(tokens))
  np.testing.assert_allclose(row, plain, atol=1e-5)
  np.testing.assert_allclose(row[:, :6], masked[:, :6], atol=1e-5)  # first document: same
  assert float(jnp.abs(row[:, 6:] - masked[:, 6:]).max()) > 1e-3  # the second sees the first
