"""HuggingFace interop: import Llama / lckv-llama checkpoints, MLKV averaging, export round trip."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lckv_jax import checkpoint, convert
from lckv_jax import hf as hf_io
from tests.checkpoint_test import dirs  # noqa: F401  (a module fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

L = 4
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 16))


def _random_llama(tie: bool, seed: int, **kw):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=L if not tie else 2,
      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=tie, rms_norm_eps=1e-5, attn_implementation="eager", **kw)
  m = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
  return m


def _logits(m):
  with torch.no_grad():
    return m(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """HF checkpoints: GQA untied (single file and sharded), tied with linear RoPE scaling."""
  root = tmp_path_factory.mktemp("hf")
  m = _random_llama(False, 0)
  m.save_pretrained(root / "single", safe_serialization=True)
  m.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="20KB")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (root / "single" / name).write_text('{"dummy": "%s"}' % name)
  tied = _random_llama(True, 1, rope_theta=500.0,
                       rope_scaling={"rope_type": "linear", "factor": 2.0})
  tied.save_pretrained(root / "tied", safe_serialization=True)
  return {"root": root, "single": str(root / "single"), "sharded": str(root / "sharded"),
          "tied": str(root / "tied"), "logits": _logits(m), "tied_logits": _logits(tied),
          "sd": {k: v.numpy() for k, v in m.state_dict().items()}}


@nnx.jit
def _fwd(model, tokens):
  """Jitted parallel forward: models of one config share the compilation."""
  return model(tokens)


def _rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("which", ["single", "sharded", "tied"])
def test_llama_import_matches_transformers(hf_dirs, which):
  if which == "sharded":
    assert os.path.exists(os.path.join(hf_dirs["sharded"], hf_io.INDEX_FILE))
  model = convert.import_hf(hf_dirs[which], layer_types="_".join(map(str, range(2 if which == "tied"
                                                                                else L))))
  ref = hf_dirs["tied_logits" if which == "tied" else "logits"]
  assert _rel_err(_fwd(model, TOKENS), ref) < 1e-4
  if which == "tied":
    assert model.config.tie_word_embeddings and not hasattr(model, "lm_head")
    assert model.config.rope_theta == 500.0
    assert model.config.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}


def _ours_kv(sd, layers):
  """Mean over HF layers of K and V, in our [E, K, D] layout."""
  k = np.mean([sd[f"model.layers.{i}.self_attn.k_proj.weight"] for i in layers], axis=0)
  v = np.mean([sd[f"model.layers.{i}.self_attn.v_proj.weight"] for i in layers], axis=0)
  return k.T.reshape(32, 2, 4), v.T.reshape(32, 2, 4)


@pytest.mark.parametrize("layer_types,groups", [
    ("0_2_2_3", {0: [0], 2: [1, 2], 3: [3]}),  # LCKV, one warm-up layer at each end
    ("0_0_2_2", {0: [0, 1], 2: [2, 3]}),  # CLA
    ("3_3_3_3", {3: [0, 1, 2, 3]}),  # LCKV without warm-up
])
def test_kv_average_and_copy(hf_dirs, layer_types, groups):
  sd = hf_dirs["sd"]
  avg = convert.import_hf(hf_dirs["single"], layer_types=layer_types)
  cp = convert.import_hf(hf_dirs["single"], layer_types=layer_types, kv_init="copy")
  for i in range(L):
    a, c = nnx.to_pure_dict(avg.layer_params(i)), nnx.to_pure_dict(cp.layer_params(i))
    q = sd[f"model.layers.{i}.self_attn.q_proj.weight"].T.reshape(32, 8, 4)
    np.testing.assert_array_equal(a["attn"]["q_proj"], q)
    np.testing.assert_array_equal(a["mlp"]["down_proj"], sd[f"model.layers.{i}.mlp.down_proj.weight"].T)
    if i not in groups:
      assert "k_proj" not in a["attn"] and "v_proj" not in a["attn"]
      continue
    k, v = _ours_kv(sd, groups[i])
    np.testing.assert_allclose(a["attn"]["k_proj"], k, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a["attn"]["v_proj"], v, rtol=1e-6, atol=1e-7)
    k, v = _ours_kv(sd, [i])
    np.testing.assert_array_equal(c["attn"]["k_proj"], k)
    np.testing.assert_array_equal(c["attn"]["v_proj"], v)


def test_round_trip_lckv_llama(hf_dirs, tmp_path):
  """Import into LCKV with sliding windows, export (lckv-llama), import: identical."""
  model = convert.import_hf(hf_dirs["single"], layer_types="0s_2_2_3s", sliding_window=5,
                            force_nodiag=True, forward_passes=1, backward_passes=1)
  hf = convert.export_hf(model, str(tmp_path / "out"), max_shard_bytes=30_000)
  assert hf["model_type"] == "lckv-llama" and hf["sliding_window"] == 4  # flash convention
  names = hf_io.TensorReader(str(tmp_path / "out")).names()
  assert "model.layers.1.self_attn.k_proj.weight" not in names
  assert "model.layers.2.self_attn.v_proj.weight" in names
  back = convert.import_hf(str(tmp_path / "out"))
  assert back.config == model.config
  jax.tree.map(np.testing.assert_array_equal, _params(back), _params(model))
  np.testing.assert_array_equal(np.asarray(_fwd(back, TOKENS)), np.asarray(_fwd(model, TOKENS)))


def test_export_llama_loads_in_transformers(hf_dirs, tmp_path):
  for which, ref in (("single", "logits"), ("tied", "tied_logits")):
    model = convert.import_hf(hf_dirs[which])
    hf = convert.export_hf(model, str(tmp_path / which))
    assert hf["model_type"] == "llama"
    back = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / which), attn_implementation="eager").eval()
    assert _rel_err(_logits(back), hf_dirs[ref]) < 1e-5
    assert _rel_err(_fwd(convert.import_hf(str(tmp_path / which)), TOKENS), hf_dirs[ref]) < 1e-4


def test_cli_from_hf_to_hf(hf_dirs, tmp_path, capsys):
  dst, out = str(tmp_path / "jax"), str(tmp_path / "hf")
  convert.main(["from-hf", hf_dirs["single"], dst, "--layer_types=lckv", "--kv_init=copy",
                "--forward_passes=2", "--backward_passes=1"])
  assert os.path.exists(os.path.join(dst, "tokenizer.json"))
  assert os.path.exists(os.path.join(dst, "tokenizer_config.json"))
  loaded = checkpoint.load_model(dst)
  assert loaded.config.layer_types == "0_2_2_3" and loaded.config.forward_passes == 2
  convert.main(["to-hf", dst, out])
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["model_type"] == "lckv-llama" and cfg["layer_types"] == "0_2_2_3"
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  again = convert.import_hf(out)
  jax.tree.map(np.testing.assert_array_equal, _params(again), _params(loaded))
  assert "wrote" in capsys.readouterr().out


def _lckv_llama_dir(hf_dirs, tmp_path, **config_changes):
  """A checkpoint in the reference code's format: K/V only for KV layers, extra config fields."""
  path = tmp_path / "lckv"
  os.makedirs(path)
  src = hf_dirs["single"]
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg.update(model_type="lckv-llama", architectures=["LCKVLlamaForCausalLM"],
             layer_types="0_2s_2_3", forward_passes=4, backward_passes=2, sliding_window=6,
             use_sequential=False, force_nodiag=True)
  cfg.update(config_changes)
  json.dump(cfg, open(path / "config.json", "w"))
  sd = load_file(os.path.join(src, "model.safetensors"))
  for n in ("k_proj", "v_proj"):
    del sd[f"model.layers.1.self_attn.{n}.weight"]
  save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
  return str(path), sd


def test_lckv_llama_checkpoint_loads(hf_dirs, tmp_path):
  path, sd = _lckv_llama_dir(hf_dirs, tmp_path)
  model = convert.import_hf(path)
  c = model.config
  assert (c.layer_types, c.forward_passes, c.backward_passes, c.force_nodiag) == (
      "0_2s_2_3", 4, 2, True)
  assert c.sliding_window == 7  # reference flash window 6 covers 7 keys
  assert convert.import_hf(path, reference_attention="eager").config.sliding_window == 6
  assert all(c.layer_spec.diag_masked)
  # Importing with the checkpoint's own layer_types keeps every K/V weight as it is.
  k = nnx.to_pure_dict(model.layer_params(2))["attn"]["k_proj"]
  np.testing.assert_array_equal(k, sd["model.layers.2.self_attn.k_proj.weight"].T.reshape(32, 2, 4))
  # Re-targeting: layer 1 used layer 2's K/V in the source, so layer 2 = mean(src 2, src 2) etc.
  cla = convert.import_hf(path, layer_types="0_0_2_2")
  k0 = nnx.to_pure_dict(cla.layer_params(0))["attn"]["k_proj"]
  expected = (sd["model.layers.0.self_attn.k_proj.weight"] +
              sd["model.layers.2.self_attn.k_proj.weight"]) / 2
  np.testing.assert_allclose(k0, expected.T.reshape(32, 2, 4), rtol=1e-6, atol=1e-7)


def test_errors_name_the_field_or_tensor(hf_dirs, tmp_path):
  path, sd = _lckv_llama_dir(hf_dirs, tmp_path)
  # Wrong shape.
  bad = dict(sd)
  bad["model.layers.3.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
  save_file(bad, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*\(47, 32\)"):
    convert.import_hf(path)
  # Missing tensor.
  bad = {k: v for k, v in sd.items() if k != "model.layers.2.self_attn.v_proj.weight"}
  save_file(bad, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.v_proj\.weight.*missing"):
    convert.import_hf(path)
  # K/V tensors of a layer that computes no KV.
  save_file(hf_dirs["sd"], os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.1\.self_attn\.k_proj"):
    convert.import_hf(path)
  # Config fields.
  cfg = json.load(open(os.path.join(path, "config.json")))
  for change, pattern in (({"model_type": "mistral"}, "model_type 'mistral'"),
                          ({"attention_bias": True}, "attention_bias"),
                          ({"mlp_bias": True}, "mlp_bias"),
                          ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"layer_types": "0_2_2"}, "layer_types")):
    json.dump({**cfg, **change}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=pattern):
      convert.import_hf(path)
  with pytest.raises(ValueError, match="kv_init"):
    convert.import_hf(hf_dirs["single"], kv_init="median")


def test_rope_and_config_mapping():
  base = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  c = convert.config_from_hf({**base, "rope_parameters": {
      "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
  assert c.rope_theta == 5e5 and c.rope_scaling_dict["rope_type"] == "llama3"
  c = convert.config_from_hf({**base, "rope_theta": 1234.0, "rope_scaling": None,
                              "torch_dtype": "bfloat16"})
  assert c.rope_theta == 1234.0 and c.rope_scaling is None and c.param_dtype == "bfloat16"
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    convert.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  hf = convert.config_to_hf(convert.config_from_hf(base, layer_types="1_1"))
  assert hf["model_type"] == "lckv-llama" and hf["sliding_window"] is None
  assert convert.config_to_hf(convert.config_from_hf(base))["model_type"] == "llama"
  assert convert.config_to_hf(convert.config_from_hf(base, force_nodiag=True))[
      "model_type"] == "lckv-llama"


def test_special_token_ids_travel_through_from_hf_and_to_hf(hf_dirs, tmp_path):
  """to-hf used to drop bos/eos ids, so transformers assumed 1 and 2 and never stopped."""
  src = tmp_path / "src"
  os.makedirs(src)
  cfg = json.load(open(os.path.join(hf_dirs["single"], "config.json")))
  cfg.update(bos_token_id=5, eos_token_id=7, pad_token_id=0)
  json.dump(cfg, open(src / "config.json", "w"))
  for name in ("model.safetensors",):
    os.symlink(os.path.join(hf_dirs["single"], name), src / name)
  dst, out = str(tmp_path / "jax"), str(tmp_path / "hf")
  convert.main(["from-hf", str(src), dst])  # the source has no generation_config.json
  assert json.load(open(os.path.join(dst, "generation_config.json"))) == {
      "_from_model_config": True, "bos_token_id": 5, "eos_token_id": 7, "pad_token_id": 0}
  convert.main(["to-hf", dst, out])
  back = transformers.AutoConfig.from_pretrained(out)
  assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (5, 7, 0)
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert (gen.bos_token_id, gen.eos_token_id) == (5, 7)


def test_export_takes_the_ids_from_the_tokenizer_or_says_there_are_none(tmp_path, caplog):
  from lckv_jax import tokenizer as tok_lib
  sp = tok_lib.load_tokenizer("kjv-bpe-32k")
  tok_dir = tmp_path / "tok"
  os.makedirs(tok_dir)
  tok_lib.save_tokenizer(sp, str(tok_dir))
  assert convert.special_token_ids(str(tok_dir), sp.vocab_size) == {
      "bos_token_id": sp.bos_id, "eos_token_id": sp.eos_id}
  assert sp.eos_id is not None
  # A byte-level model has no special tokens: null, not HuggingFace's default 1 and 2.
  model = convert.import_hf(convert_test_byte_dir(tmp_path))
  hf = convert.export_hf(model, str(tmp_path / "out"), tokenizer_from=str(tmp_path / "empty"))
  assert hf["bos_token_id"] is None and hf["eos_token_id"] is None
  assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).eos_token_id is None
  # Unknown (no tokenizer, not 256 tokens): a warning, and no ids are invented.
  assert convert.special_token_ids(str(tmp_path / "empty"), 96) is None


def convert_test_byte_dir(tmp_path):
  """A random 256-token HF Llama (a byte-level vocabulary) and an empty folder beside it."""
  torch.manual_seed(3)
  cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=32)
  path = tmp_path / "byte"
  transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
  os.makedirs(tmp_path / "empty")
  return str(path)


# -- bad conversions: the source is never touched, the destination never overwritten ---------------


def digest(path) -> dict:
  """sha256 of every file under `path` (and the list of names), to prove nothing changed."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = (
          hashlib.sha256(open(full, "rb").read()).hexdigest() if os.path.isfile(full) else "dir")
  return out


@pytest.fixture
def no_work(monkeypatch):
  """Conversion must refuse before it loads anything."""
  def fail(*a, **k):
    raise AssertionError("conversion loaded weights before checking its destination")
  monkeypatch.setattr(convert, "import_hf", fail)
  monkeypatch.setattr(checkpoint, "load_model", fail)


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
