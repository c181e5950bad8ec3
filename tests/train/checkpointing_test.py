"""Checkpoints of a training run (lckv_jax.train.checkpointing) on a user's bad day, on purpose:
kill -9 during a save, SIGTERM, truncated, bit-flipped and missing files. Each test asserts the
behaviour and that no checkpoint was lost.

The trainer's other fault tests share this file's compiled trainer, so they are here too:
divergence, a second process on the workdir (train.workdir), bad run settings, --init_from."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from lckv_jax import cli
from lckv_jax.train import checkpointing
from lckv_jax.train.trainer import Trainer
from tests import ROOT, tiny

STEPS = 20


def _config(**overrides):
  c = tiny.tiny_train_config(**{"log_every": 1, **overrides})
  c.checkpoint.update(every=5, keep=3)
  return c


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  """One compiled trainer for the tests that change only the workdir."""
  return Trainer(_config(), str(tmp_path_factory.mktemp("unused")))


def _train(trainer, workdir, max_steps):
  trainer.workdir = str(workdir)
  return trainer.train(max_steps=max_steps)[0]


@pytest.fixture(scope="module")
def straight(trainer, tmp_path_factory):
  """The uninterrupted run every interrupted one must equal, bit for bit."""
  return jax.device_get(_train(trainer, tmp_path_factory.mktemp("straight"), STEPS))


def _assert_identical(state, straight):
  assert int(state["step"]) == STEPS
  chex.assert_trees_all_equal(jax.device_get(state["params"]), straight["params"])
  chex.assert_trees_all_equal(jax.device_get(state["opt_state"]), straight["opt_state"])


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _tree_hash(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(os.path.relpath(p, path).encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def _run_script(body, workdir, timeout=240):
  """Runs a training script in a fresh process (so it can be killed) with the tiny config."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {ROOT!r})
      from tests.train.checkpointing_test import _config
      from lckv_jax.train import checkpointing
      from lckv_jax.train.trainer import Trainer
      WORKDIR = {workdir!r}
  """) + textwrap.dedent(body)
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_kill_9_while_a_checkpoint_is_written_resumes_bit_identically(trainer, straight, tmp_path):
  wd = str(tmp_path / "wd")
  # SIGKILL right after the save of step 15 has started (orbax writes it in the background).
  out = _run_script("""
      save = checkpointing.Checkpointer.save
      def killing_save(self, step, *a, **k):
        save(self, step, *a, **k)
        if step == 15:
          os.kill(os.getpid(), signal.SIGKILL)
      checkpointing.Checkpointer.save = killing_save
      Trainer(_config(), WORKDIR).train(max_steps=20)
  """, wd)
  assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
  assert 10 in _steps(wd)
  _assert_identical(_train(trainer, wd, STEPS), straight)
  # One metrics row per step, though steps after the restored checkpoint ran twice.
  steps = [r["step"] for r in _rows(wd) if "loss" in r]
  assert steps == list(range(1, STEPS + 1))


def test_sigterm_mid_run_resumes_bit_identically(trainer, straight, tmp_path):
  wd = str(tmp_path / "wd")
  out = _run_script("""
      device_batch = Trainer.device_batch
      calls = []
      def batch(self, b, *a):
        calls.append(1)
        if len(calls) == 13:  # a real signal, handled between steps
          os.kill(os.getpid(), signal.SIGTERM)
        return device_batch(self, b, *a)
      Trainer.device_batch = batch
      t = Trainer(_config(), WORKDIR)
      t.train(max_steps=20)
      sys.exit(75 if t.stop_signal == signal.SIGTERM else 0)
  """, wd)
  assert out.returncode == 75, out.stderr[-2000:]
  assert _steps(wd)[-1] == 13
  _assert_identical(_train(trainer, wd, STEPS), straight)


def _damage(wd, step, how):
  """Damages the state of one checkpoint: truncates or flips bytes of its array files."""
  root = os.path.join(wd, "checkpoints", str(step), "state")
  files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs
           if os.path.getsize(os.path.join(r, f)) > 64 and "d" in r.split(os.sep)[-1]]
  assert files, os.listdir(root)
  for path in files:
    size = os.path.getsize(path)
    if how == "truncate":
      with open(path, "r+b") as f:
        f.truncate(size // 2)
    else:
      with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = bytearray(f.read(16))
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_carries_on(trainer, straight,
                                                                         tmp_path, how):
  wd = str(tmp_path / "wd")
  _train(trainer, wd, 15)
  _damage(wd, 15, how)
  _assert_identical(_train(trainer, wd, STEPS), straight)  # resumes from 10, passes 15
  aside = os.listdir(os.path.join(wd, checkpointing.DAMAGED_DIR))
  assert len(aside) == 1 and aside[0].startswith("15.") and aside[0].split(".")[1] in (
      "unreadable", "corrupt"), aside
  assert open(os.path.join(wd, checkpointing.DAMAGED_DIR, aside[0], "WHY.txt")).read()
  assert _steps(wd) == [10, 15, 20]
  # A second run finds nothing to resume past and loses nothing.
  assert int(_train(trainer, wd, STEPS)["step"]) == STEPS and _steps(wd) == [10, 15, 20]


def test_missing_files_and_non_finite_values_are_damage_too(trainer, tmp_path):
  import orbax.checkpoint as ocp
  wd = str(tmp_path / "wd")
  _train(trainer, wd, 10)
  ckpt = checkpointing.Checkpointer(wd, 5)
  bad = jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x,
                     ckpt.restore(trainer.abstract_state)[1])
  with pytest.raises(RuntimeError, match="non-finite"):  # the last line of defence
    ckpt.save(15, bad, {"step": 15}, trainer.config.to_json())
  # Written anyway behind our back, as a foreign or buggy writer could.
  ckpt.manager.save(15, args=ocp.args.Composite(
      state=ocp.args.StandardSave(checkpointing._flatten(bad)),
      data=ocp.args.JsonSave({"step": 15}),
      config=ocp.args.JsonSave(json.loads(trainer.config.to_json()))))
  ckpt.close()
  shutil.rmtree(os.path.join(wd, "checkpoints", "10", "config"))  # a file gone missing
  assert int(_train(trainer, wd, 15)["step"]) == 15  # from step 5
  assert sorted(os.listdir(os.path.join(wd, checkpointing.DAMAGED_DIR))) == [
      "10.unreadable", "15.nonfinite"]
  assert _steps(wd) == [5, 10, 15]


def test_unreadable_checkpoints_stop_the_run_and_are_kept(trainer, tmp_path):
  wd = str(tmp_path / "wd")
  _train(trainer, wd, 10)
  for step in _steps(wd):
    _damage(wd, step, "truncate")
  before = _tree_hash(os.path.join(wd, "checkpoints"))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"no checkpoint .* can be restored .*step 10: .*step 5: .*Nothing "
                           r"was moved or deleted"):
    _train(trainer, wd, STEPS)
  assert _tree_hash(os.path.join(wd, "checkpoints")) == before
  assert not os.path.exists(os.path.join(wd, checkpointing.DAMAGED_DIR))


def test_divergence_stops_with_the_step_and_keeps_the_finite_checkpoints(trainer, tmp_path):
  wd = str(tmp_path / "wd")
  _train(trainer, wd, 10)
  good = _tree_hash(os.path.join(wd, "checkpoints", "10"))
  c = _config()
  c.optimizer.lr = 1e30  # an absurd rate: the parameters overflow within steps
  c.checkpoint.keep = 1  # rotation must still never drop the newest finite checkpoint
  with pytest.raises(cli.Diverged, match=r"diverged at step 1[1-9]: .*newest checkpoint \(step "
                                         r"1[05]\) is finite"):
    Trainer(c, wd).train(max_steps=STEPS)
  steps = _steps(wd)
  assert steps and steps[-1] >= 10
  ckpt = checkpointing.Checkpointer(wd, 5)
  step, state, _ = ckpt.restore(trainer.abstract_state)
  ckpt.close()
  assert step == steps[-1] and checkpointing.fingerprint(state)[1]
  if steps[-1] == 10:
    assert _tree_hash(os.path.join(wd, "checkpoints", "10")) == good


def test_a_second_process_on_the_workdir_is_refused_and_a_killed_one_does_not_block(trainer,
                                                                                   tmp_path):
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {ROOT!r})
      from lckv_jax.train.workdir import WorkdirLock
      with WorkdirLock({wd!r}):
        print("locked", flush=True)
        time.sleep(600)
  """)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(cli.UserError, match=rf"in use by another run \(pid {holder.pid} on host "):
      _train(trainer, wd, 5)
  finally:
    holder.kill()  # kill -9: the lock file stays, stale
    holder.wait()
  assert os.path.exists(os.path.join(wd, ".lock"))
  assert int(_train(trainer, wd, 5)["step"]) == 5


def test_bad_run_settings_are_refused_before_anything_is_written(trainer, tmp_path):
  from lckv_jax.train.workdir import check_new_target
  for field, value, message in [("checkpoint.keep", 0, r"checkpoint.keep must be an integer in "
                                 r"\[1, inf\), got 0"),
                                ("optimizer.lr", -1e-3, r"optimizer.lr must be a number in \(0"),
                                ("optimizer.warmup_fraction", 1.5, "warmup_fraction"),
                                ("optimizer.min_lr_ratio", -0.1, "min_lr_ratio"),
                                ("optimizer.b2", 1.0, "optimizer.b2")]:
    c = _config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=message):
      Trainer(c, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")
  (tmp_path / "file").write_text("x")
  with pytest.raises(cli.UserError, match="is a file, not a directory"):
    _train(trainer, tmp_path / "file", 1)
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "config.json").write_text("{}")
  with pytest.raises(cli.UserError, match="already exists and is not empty"):
    check_new_target(str(tmp_path / "export"), "--export_model")
  # A directory nobody may write, root included: sysfs takes no new files.
  with pytest.raises(cli.UserError, match="is not a writable directory"):
    _train(trainer, "/sys/kernel", 1)


def test_a_preset_and_its_literal_string_resume_as_the_same_model(trainer, tmp_path):
  wd = str(tmp_path / "wd")
  _train(trainer, wd, 5)  # layer_types='lckv'
  c = _config()
  c.model.layer_types = "0_2_2_3"
  state, _ = Trainer(c, wd).train(max_steps=10)
  assert int(state["step"]) == 10


def test_init_from_other_shapes_names_the_fields(trainer, tmp_path):
  from flax import nnx
  from lckv_jax import checkpoint
  from lckv_jax.train.config import model_config
  from lckv_jax.model import Transformer
  other = model_config(_config()).replace(hidden_size=48, num_layers=2, layer_types="llama")
  checkpoint.save_model(str(tmp_path / "m"), Transformer(other, rngs=nnx.Rngs(1)))
  with pytest.raises(cli.UserError, match=r"other parameter shapes .*hidden_size=48 \(run: 32\)"
                                          r".*--config.model.hidden_size=48"):
    trainer.workdir = str(tmp_path / "wd")
    trainer.train(max_steps=1, init_from=str(tmp_path / "m"))
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")  # nothing left behind


def _saved_model(path, **changes):
  from flax import nnx
  from lckv_jax import checkpoint
  from lckv_jax.model import Transformer
  from lckv_jax.train.config import model_config
  cfg = model_config(_config()).replace(**changes)
  checkpoint.save_model(str(path), Transformer(cfg, rngs=nnx.Rngs(1)))
  return str(path)


def test_init_from_a_bfloat16_checkpoint_trains_in_the_runs_float32(trainer, tmp_path):
  """A HuggingFace conversion keeps its bfloat16 weights; training used to refuse them."""
  from lckv_jax import checkpoint
  m = _saved_model(tmp_path / "m", param_dtype="bfloat16")
  trainer.workdir = str(tmp_path / "wd")
  state, _ = trainer.train(max_steps=1, init_from=m)
  embed = state["params"]["embed"]
  assert embed.dtype == np.float32 and int(state["step"]) == 1
  saved = checkpoint.load_model(m).embed[...]
  assert np.abs(np.asarray(embed) - np.asarray(saved, np.float32)).max() < 0.1  # one small step
