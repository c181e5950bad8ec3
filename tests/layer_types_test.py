"""Parsing, derived properties, the iteration plan, presets and scan runs of `layer_types`."""

import pytest

from lckv_jax import layer_types as L


def test_parse_lckv_derives_the_paper_properties():
  lt = L.parse(L.lckv(22), 22)
  assert str(lt) == "0_" + "20_" * 20 + "21"
  assert lt.kv_layers == (0, 20, 21)
  assert lt.attends_top == (False,) + (True,) * 19 + (False, False)
  assert lt.diag_masked == lt.attends_top
  assert lt.plan() == (L.Segment(0, 1, False), L.Segment(1, 21, True), L.Segment(21, 22, False))


def test_sliding_suffix_and_force_nodiag():
  lt = L.parse("0s_1s_2_2", 4, force_nodiag=True)
  assert lt.sliding == (True, True, False, False)
  assert lt.diag_masked == (True,) * 4
  assert lt.kv_layers == (0, 1, 2)
  assert lt.plan() == (L.Segment(0, 4, False),)


@pytest.mark.parametrize("spec,n,match", [
    ("0_1_x_3", 4, r"bad token 'x' at position 2"),
    ("0_1_2s2_3", 4, r"bad token '2s2' at position 2"),
    ("0__2_3", 4, r"bad token '' at position 1"),
    ("0_1_2", 4, r"3 tokens but num_layers is 4"),
    ("0_1_9_3", 4, r"token '9' at position 2 attends to layer 9.*0\.\.3"),
    ("", 4, "non-empty"),
])
def test_bad_strings_name_the_token_and_position(spec, n, match):
  with pytest.raises(ValueError, match=match):
    L.parse(spec, n)


def test_cyclic_group_extends_to_the_highest_reachable_target():
  # Layer 1 attends to 3, and layer 2 (inside that range) attends to 5: one group [1..5].
  lt = L.parse("0_3_5_3_4_5_6", 7)
  assert lt.plan() == (L.Segment(0, 1, False), L.Segment(1, 6, True), L.Segment(6, 7, False))
  assert L.parse("1_1_3_3", 4).plan() == (L.Segment(0, 2, True), L.Segment(2, 4, True))
  assert not L.parse(L.cla(8), 8).has_cycle


@pytest.mark.parametrize("name,n,expected", [
    ("llama", 8, "0_1_2_3_4_5_6_7"),
    ("lckv", 8, "0_6_6_6_6_6_6_7"),
    ("lckv:0", 8, "7_7_7_7_7_7_7_7"),
    ("lckv:10", 22, "0_1_2_3_4_" + "16_" * 12 + "17_18_19_20_21"),
    ("sandwich", 8, "0_3_3_3_3_3_3_7"),
    ("sandwich", 22, "0_" + "10_" * 20 + "21"),
    ("cla", 8, "0_0_2_2_4_4_6_6"),
    ("cla:3", 7, "0_0_0_3_3_3_6"),
    ("yoco", 8, "0s_1s_2s_3s_4_4_4_4"),
    ("yoco", 22, "_".join(f"{i}s" for i in range(11)) + "_11" * 11),
    ("mixattention", 22, "0_1s_1s_3s_3s_3s_0_7s_7s_9s_9s_9s_12_13s_13s_15s_15s_15s_12_19s_19s_19s"),
])
def test_presets_give_the_study_strings(name, n, expected):
  assert L.resolve(name, n) == expected
  L.parse(expected, n)


def test_literal_strings_pass_through_resolve():
  assert L.resolve("0_0_2_2", 4) == "0_0_2_2"


@pytest.mark.parametrize("spec,match", [("cla:x", "must be an integer"),
                                        ("yoco:3", "takes no argument"),
                                        ("lckv:9", "warmup_layers must be in 0..7")])
def test_bad_preset_arguments(spec, match):
  with pytest.raises(ValueError, match=match):
    L.resolve(spec, 8)


def test_grouped_builder():
  assert L.grouped([[0], [1, 2, 3, 4, 5, 6], [7]], "middle") == L.sandwich(8)
  assert L.grouped([[0, 1], [2, 3]], "top") == "1_1_3_3"
  with pytest.raises(ValueError, match="target"):
    L.grouped([[0]], "left")
  with pytest.raises(ValueError, match="cover"):
    L.grouped([[0], [2]], "top")


@pytest.mark.parametrize("name", sorted(L.PRESETS))
@pytest.mark.parametrize("n", [4, 8, 22, 32])
def test_scan_runs_cover_every_layer_once_and_repeat_exactly(name, n):
  lt = L.parse(L.resolve(name, n), n)
  for seg in lt.plan():
    runs = L.scan_runs(lt, seg)
    assert runs[0].start == seg.start and runs[-1].end == seg.end
    assert all(a.end == b.start for a, b in zip(runs, runs[1:]))
    for run in runs:
      for b in range(run.num_blocks):
        for o, role in enumerate(run.roles):
          i = run.layer(b, o)
          assert role.computes_kv == lt.computes_kv[i]
          j = role.source
          assert (run.layer(b, j) if role.in_block else j) == lt.attends_to[i]


def test_scan_runs_compress_deep_models():
  lt = L.parse(L.llama(32), 32)
  assert [(r.period, r.num_blocks) for r in L.scan_runs(lt, lt.plan()[0])] == [(1, 32)]
  lt = L.parse(L.cla(32), 32)
  assert [(r.period, r.num_blocks) for r in L.scan_runs(lt, lt.plan()[0])] == [(2, 16)]
  lt = L.parse(L.lckv(22), 22)
  group = lt.plan()[1]
  assert [(r.start, r.period, r.num_blocks) for r in L.scan_runs(lt, group)] == [(1, 1, 19),
                                                                                  (20, 1, 1)]
  assert all(r.num_blocks == 1 for r in L.scan_runs(lt, group, scan_layers=False))


def test_kv_bytes_match_the_spec_example():
  # docs/spec.md §8: TinyLlama in bf16, 22,528 B per token for llama and 3,072 B for LCKV w=2.
  assert L.parse(L.llama(22)).kv_bytes_per_token(4, 64, 2) == 22528
  assert L.parse(L.lckv(22)).kv_bytes_per_token(4, 64, 2) == 3072


# -- the NAACL study's grid ---------------------------------------------------------------------

# The nine configurations at a 2x KV-cache reduction (half the layers compute KV) and at the
# LCKV paper's 3 KV layers, for 12 layers (the 110M shape) and 22 (TinyLlama).
STUDY_12 = {
    "pizza-bottom": "0_1_2_3_4_5_5_5_5_5_5_5",
    "pizza-top": "0_1_2_3_4_11_11_11_11_11_11_11",
    "pizza-middle": "0_1_2_3_4_8_8_8_8_8_8_8",
    "sandwich-bottom": "0_1_2_3_3_3_3_3_3_3_10_11",
    "sandwich-top": "0_1_2_9_9_9_9_9_9_9_10_11",
    "sandwich-middle": "0_1_2_6_6_6_6_6_6_6_10_11",
    "lasagna-bottom": "0_0_2_2_4_4_6_6_8_8_10_10",
    "lasagna-top": "0_3_3_3_5_5_7_7_9_9_11_11",
    "lasagna-middle": "0_0_2_2_4_4_6_6_8_8_10_10",
    "sandwich-top:3": "0_10_10_10_10_10_10_10_10_10_10_11",
    "sandwich-middle:3": "0_5_5_5_5_5_5_5_5_5_5_11",
    "pizza-bottom:3": "0_1_2_2_2_2_2_2_2_2_2_2",
    "lasagna-bottom:3": "0_0_0_0_4_4_4_4_8_8_8_8",
    "lasagna-top:3": "0_6_6_6_6_6_6_11_11_11_11_11",
}
STUDY_22 = {
    "pizza-bottom": "_".join(map(str, list(range(10)) + [10] * 12)),
    "pizza-top": "_".join(map(str, list(range(10)) + [21] * 12)),
    "sandwich-middle": "_".join(map(str, list(range(5)) + [10] * 12 + list(range(17, 22)))),
    "lasagna-bottom": "_".join(str(2 * (i // 2)) for i in range(22)),  # CLA, groups of 2
    "lasagna-top": "0_3_3_3_" + "_".join(str(2 * (i // 2) + 1) for i in range(4, 22)),
    "sandwich-top:3": "0_" + "_".join(["20"] * 20) + "_21",  # LCKV
    "sandwich-middle:3": "0_" + "_".join(["10"] * 20) + "_21",  # the authors' recommendation
}


@pytest.mark.parametrize("n,table", [(12, STUDY_12), (22, STUDY_22)])
def test_study_presets_are_the_papers_configurations(n, table):
  for name, want in table.items():
    got = L.resolve(name, n)
    assert got == want, name
    lt = L.parse(got, n)
    kv = int(name.split(":")[1]) if ":" in name else n // 2
    assert len(lt.kv_layers) == kv and lt.computes_kv[0], name  # layer 0 stays a KV layer
    target = name.split("-")[1].split(":")[0]
    assert lt.has_cycle == (target in ("top", "middle") and any(
        j > i for i, j in enumerate(lt.attends_to))), name


def test_existing_methods_are_special_cases_and_have_names():
  assert L.resolve("sandwich-top:3", 22) == L.lckv(22, 2)
  assert L.resolve("sandwich-middle:3", 22) == L.sandwich(22, 2)
  assert L.resolve("lasagna-bottom", 12) == L.cla(12, 2)
  yoco = L.yoco(12).replace("s", "")  # YOCO without its sliding window
  assert L.resolve("pizza-bottom:7", 12) == yoco
  assert L.known_names(L.lckv(22), 22) == ["lckv", "lckv:2", "sandwich-top:3"]
  assert "lasagna-bottom" in L.known_names("cla", 12)
  assert L.known_names("0_0_1_3", 4) == []
  assert "known as: sandwich, sandwich:2, sandwich-middle:3" in L.describe(
      L.parse_spec("sandwich-middle:3", 12))


def test_study_presets_refuse_what_the_study_does_not_have():
  with pytest.raises(ValueError, match=r"kv_layers must be an integer in 2\.\.12"):
    L.resolve("pizza-top:1", 12)
  with pytest.raises(ValueError, match=r"kv_layers must be an integer in 2\.\.12"):
    L.resolve("lasagna-top:13", 12)
  with pytest.raises(ValueError, match="partition must be one of"):
    L.study("lasgana", "top", 12)
  with pytest.raises(ValueError, match="target must be one of"):
    L.study("pizza", "center", 12)
