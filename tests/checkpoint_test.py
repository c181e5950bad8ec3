"""Bad inputs fail loudly: conversion never touches its source, out-of-range ids and positions
raise (or give NaN under a user's jit), and the CLIs report user errors in one line."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lckv_jax import checkpoint, cli, convert
from lckv_jax import generation as gen_lib
from lckv_jax.model import check_inputs
from tests import ROOT as REPO, tiny

sys.path.insert(0, REPO)
import generate as generate_py  # noqa: E402  (the CLI script at the repository root)

VOCAB, LIMIT = 256, 32
# The models of these tests: 256 token ids, 32 positions.
LIMITED = dict(vocab_size=VOCAB, layer_types="lckv", max_position_embeddings=LIMIT,
               forward_passes=1, backward_passes=1)


def tokens(batch=2, length=8, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def digest(path) -> dict:
  """sha256 of every file under `path` (and the list of names), to prove nothing changed."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = (
          hashlib.sha256(open(full, "rb").read()).hexdigest() if os.path.isfile(full) else "dir")
  return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """An lckv-jax model checkpoint and its HuggingFace export (with a tokenizer file)."""
  root = tmp_path_factory.mktemp("faults")
  model = tiny.tiny_model(**LIMITED)
  checkpoint.save_model(str(root / "jax"), model)
  convert.export_hf(model, str(root / "hf"))
  (root / "hf" / "tokenizer.json").write_text('{"dummy": true}')
  return {"root": root, "jax": str(root / "jax"), "hf": str(root / "hf")}


@pytest.fixture
def no_work(monkeypatch):
  """Conversion must refuse before it loads anything."""
  def fail(*a, **k):
    raise AssertionError("conversion loaded weights before checking its destination")
  monkeypatch.setattr(convert, "import_hf", fail)
  monkeypatch.setattr(checkpoint, "load_model", fail)


# -- conversion never touches its source -----------------------------------------------------------


def test_from_hf_into_or_around_its_source_refuses_and_leaves_it_byte_identical(dirs, no_work):
  src = dirs["hf"]
  before = digest(src)
  for dst, message in ((src, "is the source"), (os.path.join(src, "sub"), "inside the source"),
                       (os.path.join(src, ".", ""), "is the source"),
                       (str(dirs["root"]), "contains the source")):
    with pytest.raises(FileExistsError, match=message):
      convert.main(["from-hf", src, dst])
  assert digest(src) == before


def test_conversion_refuses_a_destination_that_holds_anything(dirs, tmp_path, no_work):
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "notes.txt").write_text("mine")
  (tmp_path / "file").write_text("mine")
  before = digest(tmp_path)
  for command, src in (("from-hf", dirs["hf"]), ("to-hf", dirs["jax"])):
    with pytest.raises(FileExistsError, match=r"already holds files \(notes.txt\)"):
      convert.main([command, src, str(taken)])
    with pytest.raises(FileExistsError, match="is a file"):
      convert.main([command, src, str(tmp_path / "file")])
  assert digest(tmp_path) == before


def test_writers_never_overwrite_a_file(dirs, tmp_path):
  model = checkpoint.load_model(dirs["jax"])
  out = tmp_path / "out"
  out.mkdir()
  (out / "model.safetensors").write_bytes(b"precious")
  with pytest.raises(FileExistsError, match="model.safetensors"):
    convert.main(["to-hf", dirs["jax"], str(out)])
  with pytest.raises(FileExistsError, match="already holds files"):
    convert.export_hf(model, str(out))
  with pytest.raises(FileExistsError, match="already holds files"):
    checkpoint.save_model(str(out), model)
  with pytest.raises(FileExistsError, match="is a file"):
    checkpoint.save_model(str(out / "model.safetensors"), model)
  assert (out / "model.safetensors").read_bytes() == b"precious"
  assert sorted(os.listdir(out)) == ["model.safetensors"]
  # An empty directory is a fine destination.
  (tmp_path / "empty").mkdir()
  checkpoint.save_model(str(tmp_path / "empty"), model)


def test_conversion_sources_of_the_wrong_kind_name_the_other_command(dirs, tmp_path, no_work):
  with pytest.raises(ValueError, match="`to-hf` converts it"):
    convert.main(["from-hf", dirs["jax"], str(tmp_path / "a")])
  with pytest.raises(ValueError, match="`from-hf` converts it"):
    convert.main(["to-hf", dirs["hf"], str(tmp_path / "b")])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.main(["from-hf", str(tmp_path / "nowhere"), str(tmp_path / "c")])
  with pytest.raises(ValueError, match="--max_shard_size.*'lots'"):
    convert.main(["to-hf", dirs["jax"], str(tmp_path / "d"), "--max_shard_size=lots"])
  assert not any(os.path.exists(tmp_path / n) for n in "abcd")


def test_damaged_hf_sources_are_one_message_naming_the_file(dirs, tmp_path):
  bad = tmp_path / "hf"
  bad.mkdir()
  (bad / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    convert.import_hf(str(bad))
  cfg = json.load(open(os.path.join(dirs["hf"], "config.json")))
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
    convert.import_hf(str(bad))
  (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
  with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
    convert.import_hf(str(bad))
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama"):
    convert.import_hf(str(bad))


# -- the model: ids and positions ------------------------------------------------------------------


@nnx.jit
def _fwd(model, toks, pos=None, seg=None):
  return model(toks, pos, seg)


def test_model_raises_on_out_of_range_ids_and_positions_naming_the_limit(tiny_model):
  model = tiny_model(**LIMITED)
  t = tokens()
  for bad, shown in ((VOCAB, "256"), (300, "300"), (-1, "-1")):
    t_bad = t.copy()
    t_bad[1, 3] = bad
    msg = rf"token id {shown} is outside the vocabulary \[0, 256\) \(model.vocab_size=256\)"
    for call in (model, model.sequential):
      with pytest.raises(ValueError, match=msg):
        call(jnp.asarray(t_bad))
  pos = np.tile(np.arange(8), (2, 1))
  pos[0, -1] = LIMIT
  with pytest.raises(ValueError, match=r"position 32 is outside \[0, 32\) "
                                       r"\(max_position_embeddings=32\)"):
    model(t, pos)
  long = tokens(length=LIMIT + 1)
  for call in (model, lambda x: _fwd(model, x)):  # eager, and static under jit
    with pytest.raises(ValueError, match="33 tokens exceeds max_position_embeddings=32"):
      call(long)
  # Padding (segment 0) carries any id and position.
  seg = np.ones_like(t)
  seg[0, :2] = 0
  t[0, :2], pos[0, :2] = -1, 99
  pos[0, -1] = 7
  check_inputs(model.config, t, pos, seg)


def test_traced_bad_ids_give_nan_rows_and_leave_other_rows_and_gradients_alone(tiny_model):
  model = tiny_model(**LIMITED)
  good = tokens()
  bad = good.copy()
  bad[1, 5] = 300
  ref = np.asarray(_fwd(model, good))
  out = np.asarray(_fwd(model, bad))
  assert np.isnan(out[1]).all()
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
  # Traced positions past the limit and bad ids on padding.
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  pos[1, -1] = LIMIT
  out = np.asarray(_fwd(model, good, pos))
  assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
  seg = np.ones_like(good)
  seg[:, 0] = 0
  padded = good.copy()
  padded[:, 0] = -5
  assert np.isfinite(np.asarray(_fwd(model, padded, None, seg))).all()

  @nnx.jit
  def grads(model, toks):
    def loss(model):
      logits = model(toks)
      return jnp.mean(jax.nn.log_softmax(logits[0])[:, 0])  # row 0 only
    return nnx.grad(loss)(model)

  g_bad, g_good = grads(model, bad), grads(model, good)
  leaves_bad = jax.tree.leaves(nnx.state(g_bad, nnx.Param))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves_bad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nnx.state(g_bad, nnx.Param), nnx.state(g_good, nnx.Param))

  # The whole batch's loss is NaN: a training loop's divergence check stops.
  @nnx.jit
  def batch_loss(model, toks):
    return jnp.mean(jax.nn.log_softmax(model(toks)))
  assert np.isnan(float(batch_loss(model, bad)))


# -- generation ------------------------------------------------------------------------------------


def test_generation_refuses_prompts_past_the_limits(tiny_model):
  model = tiny_model(**LIMITED)
  with pytest.raises(ValueError, match="prompt of 33 tokens exceeds max_position_embeddings=32"):
    gen_lib.generate(model, [tokens(1, 33)[0].tolist()])
  with pytest.raises(ValueError, match=r"prompt of 20 tokens \+ max_new_tokens=16 = 36 positions "
                                       r"exceeds max_position_embeddings=32"):
    gen_lib.generate(model, [tokens(1, 20)[0].tolist()], max_new_tokens=16)
  with pytest.raises(ValueError, match=r"prompt 1 of 30 tokens \+ max_new_tokens=4"):
    gen_lib.generate(model, [[1, 2], tokens(1, 30)[0].tolist()], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"n_sink \+ window = 40 positions exceeds "
                                       "max_position_embeddings=32"):
    gen_lib.generate(model, [[1, 2]], max_new_tokens=64, sink=(4, 36))
  with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
    gen_lib.generate(model, [[1, 300]])
  with pytest.raises(ValueError, match="token id -2 is outside"):
    gen_lib.generate(model, np.asarray([[1, -2]]))
  with pytest.raises(ValueError, match="token ids must be integers, got 2.5"):
    gen_lib.generate(model, [[1, 2.5]])
  t, pos, seg, _ = gen_lib.pad_prompts([[1, 2, 3], [4]], VOCAB)
  t[1, 2] = VOCAB
  cache = gen_lib.cache_lib.init_cache(model.config, 2, 8)
  with pytest.raises(ValueError, match="token id 256 is outside"):
    gen_lib.prefill(model, t, pos, seg, cache, jnp.zeros(2, jnp.int32))


# -- checkpoints and the generate.py CLI, in-process -----------------------------------------------


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


@pytest.mark.parametrize("flags,message", [
    (["--temperature=-1"], "--temperature must be a finite number >= 0"),
    (["--top_p=0"], r"--top_p must be in \(0, 1\]"),
    (["--top_p=1.5"], r"--top_p must be in \(0, 1\]"),
    (["--top_k=-3"], "--top_k must be >= 0"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
    (["--sink", "2", "0"], "--sink N_SINK WINDOW needs"),
    (["--dtype=float8"], "--dtype must be one of"),
])
def test_generate_cli_bad_flags(dirs, flags, message):
  with pytest.raises(cli.UserError, match=message):
    generate_py.main([f"--checkpoint={dirs['jax']}", "--prompt=hi", *flags])


def test_generate_cli_bad_files(dirs, tmp_path):
  run = lambda *a: generate_py.main(list(a))
  with pytest.raises(cli.UserError, match="--checkpoint=DIR is required"):
    run("--prompt=hi")
  with pytest.raises(cli.UserError, match="does not exist"):
    run(f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi")
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café\n".encode("latin-1"))
  with pytest.raises(cli.UserError, match=f"--prompts_file {latin} is not UTF-8 text"):
    run(f"--checkpoint={dirs['jax']}", f"--prompts_file={latin}")
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n")
  with pytest.raises(cli.UserError, match="holds no prompt"):
    run(f"--checkpoint={dirs['jax']}", f"--prompts_file={blank}")
  with pytest.raises(cli.UserError, match="--prompts_file .*nope.txt: No such file"):
    run(f"--checkpoint={dirs['jax']}", f"--prompts_file={tmp_path / 'nope.txt'}")
  with pytest.raises(cli.UserError, match="give --prompt"):
    run(f"--checkpoint={dirs['jax']}")
  with pytest.raises(cli.UserError, match="prompt 1 is empty"):
    run(f"--checkpoint={dirs['jax']}", "--prompt=a", "--prompt=")


# -- the real entry points: one line on stderr, exit code 2, --debug -------------------------------

_DRIVER = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, traceback, warnings
    warnings.simplefilter("ignore")
    out = []
    for target, argv in json.loads(sys.argv[1]):
      err = io.StringIO()
      sys.argv = [target] + argv
      code = 0
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
          if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
          else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
          code = e.code
        except Exception:
          code, _ = "raised", traceback.print_exc(file=err)
      out.append([code, err.getvalue()])
    print(json.dumps(out))
""")


def _run(args):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("LCKV_DEBUG", None)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def test_clis_report_user_errors_in_one_line_and_exit_2(dirs, tmp_path):
  wd = tmp_path / "workdir"
  (wd / "checkpoints").mkdir(parents=True)
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café\n".encode("latin-1"))
  dmg = damaged(dirs["jax"], tmp_path / "dmg")
  ck = f"--checkpoint={dirs['jax']}"
  cases = [
      ("generate.py", [f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi"], "does not exist"),
      ("generate.py", [f"--checkpoint={wd}", "--prompt=hi"], "training workdir"),
      ("generate.py", [ck, f"--prompts_file={latin}"], "not UTF-8"),
      ("generate.py", [ck, "--prompt=hi", "--temperature=-1"], "--temperature"),
      ("lckv_jax.convert", ["from-hf", dirs["hf"], dirs["hf"]], "is the source"),
      ("lckv_jax.convert", ["to-hf", str(wd), str(tmp_path / "x")], "training workdir"),
      ("generate.py", [ck, "--prompt=hi", "--temperature=-1", "--debug"], None),
  ]
  out = _run(["-c", _DRIVER, json.dumps([c[:2] for c in cases])])
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for (target, argv, message), (code, err) in zip(cases, results):
    if message is None:  # --debug: the traceback instead
      assert code == "raised" and "Traceback" in err and "--temperature" in err, err
      continue
    prog = "generate.py" if target == "generate.py" else "python -m lckv_jax.convert"
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), (argv, err)
    assert message in err, (argv, err)
  # A real process: orbax's noise ("Event loop is closed", advice) must not reach stderr.
  out = _run(["generate.py", f"--checkpoint={dmg}", "--prompt=hi"])
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and "damaged model checkpoint" in out.stderr, out.stderr
