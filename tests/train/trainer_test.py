"""The training loop (lckv_jax.train.trainer): the tiny model learns, a resumed run equals a
straight one, bad settings stop it before anything runs. Its fault tests (kills, damaged
checkpoints, divergence, the workdir lock, --init_from) share a compiled trainer with the checkpoint
tests in train/checkpointing_test.py; train.py itself is tested in tests/train_py_test.py."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax.train.trainer import Trainer
from tests import tiny


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
