"""Model checkpoints (lckv_jax.checkpoint): what they store, and loading errors that name the
directory and the cause. `dirs`, a saved tiny model and its HuggingFace export, serves the
bad-input tests of convert, generate.py and the command lines too."""

import glob
import json
import os
import shutil

import pytest

from lckv_jax import checkpoint, convert
from tests import tiny

VOCAB, LIMIT = 256, 32
# The models of the bad-input tests (here, model_test, generation_test): 256 ids, 32 positions.
LIMITED = dict(vocab_size=VOCAB, layer_types="lckv", max_position_embeddings=LIMIT,
               forward_passes=1, backward_passes=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """An lckv-jax model checkpoint and its HuggingFace export (with a tokenizer file)."""
  root = tmp_path_factory.mktemp("faults")
  model = tiny.tiny_model(**LIMITED)
  checkpoint.save_model(str(root / "jax"), model)
  convert.export_hf(model, str(root / "hf"))
  (root / "hf" / "tokenizer.json").write_text('{"dummy": true}')
  return {"root": root, "jax": str(root / "jax"), "hf": str(root / "hf")}


# -- loading errors: one message naming the directory and the cause --------------------------------


def test_load_errors_name_the_directory_and_the_cause(dirs, tmp_path):
  with pytest.raises(ValueError, match=r"parameter embed has shape \(256, 32\) in the checkpoint "
                                       r"but \(128, 32\) for the config with the overrides"):
    checkpoint.load_model(dirs["jax"], vocab_size=128)
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    checkpoint.load_model(dirs["jax"], vocab_sise=128)
  wd = tmp_path / "workdir"
  (wd / "checkpoints" / "100").mkdir(parents=True)
  (wd / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="training workdir.*--export_model=DIR"):
    checkpoint.load_model(str(wd))
  bad = tmp_path / "bad"
  bad.mkdir()
  for text, message in (("{oops", "config.json is not valid JSON"),
                        (json.dumps({"vocab_size": 8, "bogus": 1}),
                         r"unknown ModelConfig field\(s\) \['bogus'\]"),
                        (json.dumps({"vocab_size": -8}), "vocab_size must be a positive")):
    (bad / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
      checkpoint.load_model(str(bad))
  with pytest.raises(ValueError, match="no params/"):
    checkpoint.load_model(_copy_with(dirs["jax"], tmp_path / "noparams", drop="params"))


def _copy_with(src, dst, drop=None):
  shutil.copytree(src, dst)
  if drop:
    shutil.rmtree(os.path.join(dst, drop))
  return str(dst)


def damaged(src, dst) -> str:
  """A copy of a model checkpoint with its array data files truncated."""
  _copy_with(src, dst)
  files = [f for f in glob.glob(os.path.join(dst, "params", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(10)
  return str(dst)


def test_a_damaged_checkpoint_is_one_value_error(dirs, tmp_path):
  with pytest.raises(ValueError, match="damaged model checkpoint, cannot read params/") as e:
    checkpoint.load_model(damaged(dirs["jax"], tmp_path / "dmg"))
  assert len(str(e.value).splitlines()) == 1 and "partial_restore" not in str(e.value)


# -- the model and how it runs ---------------------------------------------------------------------


def test_a_checkpoint_stores_the_model_and_loads_with_another_run(tmp_path, tiny_config):
  import json
  import numpy as np
  from flax import nnx
  from lckv_jax import checkpoint
  from lckv_jax.model import Transformer
  cfg = tiny_config(layer_types="lckv", forward_passes=3, backward_passes=1)
  model = Transformer(cfg, rngs=nnx.Rngs(4))
  checkpoint.save_model(str(tmp_path / "m"), model)
  saved = json.loads((tmp_path / "m" / "config.json").read_text())
  assert saved["run"]["forward_passes"] == 3 and "forward_passes" not in saved
  assert saved["hidden_size"] == 32 and "dtype" not in saved
  loaded = checkpoint.load_model(str(tmp_path / "m"), run={"dtype": "bfloat16", "remat": "full"})
  assert loaded.config == cfg.with_run({"dtype": "bfloat16", "remat": "full"})
  tokens = np.random.RandomState(0).randint(0, 64, (2, 8))
  np.testing.assert_allclose(np.asarray(loaded(tokens), np.float32),
                             np.asarray(model(tokens)), atol=0.1)  # bf16 compute, same weights
  assert checkpoint.load_model(str(tmp_path / "m")).config == cfg  # the saved run by default
  # A config.json from before the "run" section (every field at the top) reads the same.
  old = {**cfg.architecture(), **{k: v for k, v in saved["run"].items()}}
  (tmp_path / "m" / "config.json").write_text(json.dumps(old))
  assert checkpoint.load_config(str(tmp_path / "m")) == cfg
  (tmp_path / "m" / "config.json").write_text(json.dumps({**saved, "run": {"speed": "max"}}))
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['run.speed'\]"):
    checkpoint.load_config(str(tmp_path / "m"))
