"""Drawing the attention graph: `show --image`, side-by-side figures, tracks, no matplotlib."""

import sys

import pytest

from lckv_jax import cli
from lckv_jax import layer_types as L
from lckv_jax import visualize
from tests.cli_test import _user_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_show_image_writes_a_png_and_keeps_the_text(tmp_path, capsys):
  pytest.importorskip("matplotlib", reason="drawing needs matplotlib (requirements.txt)")
  visualize.show_main(["show", "lckv", "--num_layers", "8"])
  text = capsys.readouterr().out
  png = tmp_path / "lckv.png"
  visualize.show_main(["show", "lckv", "--num_layers", "8", f"--image={png}"])
  out = capsys.readouterr().out
  assert out.startswith(text) and out.strip().endswith(f"wrote {png}")
  assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_side_by_side_figure_of_presets_and_literal_strings(tmp_path):
  pytest.importorskip("matplotlib", reason="drawing needs matplotlib (requirements.txt)")
  fig = visualize.figure(["llama", "lckv", "cla", "yoco", "mixattention"], 22)
  assert len(fig.axes) == 5
  assert [ax.get_title().splitlines()[-1] for ax in fig.axes] == [
      "KV cache: 22 of 22 layers", "KV cache: 3 of 22 layers", "KV cache: 11 of 22 layers",
      "KV cache: 12 of 22 layers", "KV cache: 9 of 22 layers"]
  path = tmp_path / "graphs.png"
  visualize.main([str(path), "0_3_5_3_4_5_6", "1_1_3_3"])
  assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("specs", [["lckv"], ["0_6_6_6_6_6_6_7"], ["llama", "lckv"],
                                   ["llama", "lckv", "cla", "yoco"]])
def test_legend_fits_inside_the_figure_below_the_graphs(specs):
  """One narrow graph used to clip its three-column legend at both sides."""
  pytest.importorskip("matplotlib", reason="drawing needs matplotlib (requirements.txt)")
  fig = visualize.figure(specs, 8)
  fig.canvas.draw()
  renderer = fig._get_renderer()  # noqa: SLF001 - the renderer the figure was drawn with
  legend, page = fig.legends[0].get_window_extent(renderer), fig.bbox
  assert page.x0 <= legend.x0 and legend.x1 <= page.x1 and page.y0 <= legend.y0
  assert all(ax.get_tightbbox(renderer).y0 > legend.y1 for ax in fig.axes)


def test_tracks_nest_overlapping_arrows_and_reuse_free_tracks():
  lckv = [(i, 6) for i in range(1, 6)]  # 0_6_6_6_6_6_6_7: every reader spans the shorter ones
  assert visualize._tracks(lckv) == {(5, 6): 0, (4, 6): 1, (3, 6): 2, (2, 6): 3, (1, 6): 4}
  cla = [(1, 0), (3, 2), (5, 4)]  # disjoint spans share the innermost track
  assert set(visualize._tracks(cla).values()) == {0}
  assert visualize._tracks([(1, 0), (2, 1)]) == {(1, 0): 0, (2, 1): 1}  # they meet at layer 1


def test_missing_matplotlib_gives_one_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
  with pytest.raises(ImportError, match="pip install matplotlib"):
    visualize.figure(["llama"], 4)
  with pytest.raises(SystemExit) as exit_info:  # a user error: one line, exit 2
    cli.run(visualize.show_main,
            ["show", "llama", "--num_layers", "4", f"--image={tmp_path / 'x.png'}"], prog=L.PROG)
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  captured = capsys.readouterr()
  assert "layer_types = 0_1_2_3" in captured.out
  assert captured.err == (f"{L.PROG}: error: drawing layer_types needs matplotlib, which is not "
                          "installed: pip install matplotlib\n")
  assert not (tmp_path / "x.png").exists()


def test_show_command_prints_the_graph(capsys):
  from lckv_jax import visualize  # the `show` command lives with the drawing
  visualize.show_main(["show", "lckv", "--num_layers", "8"])
  out = capsys.readouterr().out
  assert "0_6_6_6_6_6_6_7" in out and "3 of 8 layers" in out and "cyclic[1..6]" in out


def test_layer_types_and_visualize_command_lines(tmp_path, capsys):
  show = visualize.show_main  # `python -m lckv_jax.layer_types show`
  msg = _user_error(show, ["show", "lckvv"], L.PROG, capsys, r"layer_types 'lckvv' is neither")
  assert "llama, lckv, sandwich" in msg and "'0_2_2_3'" in msg  # what is allowed
  _user_error(show, ["show", "0_1_x_3"], L.PROG, capsys, r"bad token 'x' at position 2")
  _user_error(show, ["show", "lckv"], L.PROG, capsys, r"'lckv' needs num_layers")
  _user_error(show, ["show", "lckv:9", "--num_layers", "8"], L.PROG, capsys,
              r"warmup_layers must be in 0..7")
  _user_error(visualize.main, [str(tmp_path / "x.png"), "0_1_x"], visualize.PROG, capsys,
              r"bad token 'x'")
  with pytest.raises(ValueError, match="bad token"):  # --debug: the exception, not one line
    cli.run(show, ["show", "0_1_x", "--debug"], L.PROG)
