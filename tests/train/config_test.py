"""The train.py config: every field explained, --show_config, what a resumed run may change,
--init_from adopting the checkpoint's model."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from lckv_jax.train.config import default_config, from_file
from tests import ROOT
from tests.train.checkpointing_test import _config, _saved_model


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


def test_resume_refuses_another_model_and_allows_another_run(caplog):
  import json
  from lckv_jax.train.config import check_resume, default_config
  saved = json.loads(default_config().to_json())
  for field, value in (("remat", "full"), ("attention_impl", "xla"), ("forward_passes", 3),
                       ("dtype", "bfloat16")):
    now = default_config()
    now.model[field] = value
    check_resume(saved, now)
    assert f"model.{field}" in caplog.text
  for field, value in (("hidden_size", 64), ("scan_layers", False)):
    now = default_config()
    now.model[field] = value
    with pytest.raises(ValueError, match=f"config.model.{field}={value!r} but the checkpoint"):
      check_resume(saved, now)


def test_init_from_adopts_the_checkpoints_model_and_tokenizer(tmp_path):
  """The README's up-training path used to need six hand-copied --config.model.* flags."""
  from lckv_jax.tokenizer import SHIPPED
  from lckv_jax.train.config import adopt_init_from, model_config
  m = _saved_model(tmp_path / "m", hidden_size=48, num_layers=2, layer_types="llama",
                   rope_theta=500.0)
  c = _config()
  notes = adopt_init_from(c, m)
  mc = model_config(c)
  assert (mc.hidden_size, mc.num_layers, mc.layer_types, mc.rope_theta) == (48, 2, "0_1", 500.0)
  assert len(notes) == 1 and "hidden_size=48 (config: 32)" in notes[0]
  assert "layer_types=0_1 (config: 0_2_2_3)" in notes[0]
  # A field set on the command line stays; the trainer's shape check then names it.
  c = _config()
  adopt_init_from(c, m, explicit={"model.hidden_size"})
  assert model_config(c).hidden_size == 32 and model_config(c).num_layers == 2
  # The checkpoint's tokenizer replaces the config's, unless the command line names one.
  shutil.copyfile(SHIPPED["kjv-bpe-32k"], os.path.join(m, "tokenizer.model"))
  c = _config()
  notes = adopt_init_from(c, m)
  assert c.data.tokenizer == m and any("tokenizer tokenizer.model of the checkpoint" in n
                                       for n in notes)
  c = _config()
  notes = adopt_init_from(c, m, explicit={"data.tokenizer"})
  assert c.data.tokenizer == "byte" and any("the ids must match" in n for n in notes)


def test_evaluating_on_other_data_than_training_says_so(caplog):
  from lckv_jax.train.config import check_resume
  saved = json.loads(_config().to_json())
  now = _config()
  now.data.update(source="files", path="mine/*.jsonl")
  check_resume(saved, now, "the checkpoint", model_only=True)
  assert "on other data than it was trained on" in caplog.text
  assert "data.source: 'embedded' -> 'files'" in caplog.text
