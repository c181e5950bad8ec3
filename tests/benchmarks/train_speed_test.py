"""benchmarks.train_speed: several configurations in one process, compiled side by side and
timed one at a time, each a record of its own."""

from benchmarks import records, train_speed


def test_several_configurations_compile_together_and_are_timed_each(tmp_path):
  path = train_speed.main(["--shape=tiny", "--layer_types", "llama", "0_2_2_3", "--batch=2",
                           "--seq=32", "--steps=2", "--m=2", "--tag=m2", f"--out={tmp_path}"])
  got = {e["spec"]: e for e in records.read(path)}
  assert sorted(got) == ["0_2_2_3", "llama"]
  assert got["llama"]["layer_types"] == "0_1_2_3" and got["0_2_2_3"]["m"] == 2
  assert got["llama"]["setting"] == "tiny_llama_b2_s32_full_dense_m2"
  for e in got.values():
    assert e["step_s"] > 0 and abs(e["tokens_per_s"] * e["step_s"] - 2 * 32) < 0.1  # rounded
    assert e["compiled_alongside"] == 1 and e["compile_s"] > 0


def test_the_attention_kernel_is_chosen_by_name(tmp_path):
  # --attention_impl overrides `auto` (cudnn on a GPU): the H100's `dense` rows re-run on a GPU.
  path = train_speed.main(["--shape=tiny", "--layer_types", "llama", "--batch=2", "--seq=32",
                           "--steps=1", "--attention_impl=xla", f"--out={tmp_path}"])
  [e] = records.read(path)
  assert e["attention"] == "xla" and e["setting"] == "tiny_llama_b2_s32_full_xla"
