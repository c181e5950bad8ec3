"""notebooks/quickstart.ipynb runs top to bottom on the CPU, with its parameters made small."""

import os
import re

import pytest

from tests import ROOT

nbformat = pytest.importorskip(
    "nbformat", reason="the notebook test needs nbformat (pip install -r requirements-dev.txt)")
nbclient = pytest.importorskip(
    "nbclient", reason="the notebook test needs nbclient (pip install -r requirements-dev.txt)")
kernelspec = pytest.importorskip(
    "ipykernel.kernelspec",
    reason="the notebook test needs ipykernel (pip install -r requirements-dev.txt)")
pytest.importorskip("matplotlib", reason="the notebook draws with matplotlib "
                    "(pip install -r requirements-dev.txt)")

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
# Small enough for CI: a few training steps (the first one compiles), a short generation.
CI_PARAMETERS = {"TRAIN_STEPS": 10, "PLOT_EVERY": 5, "GEN_TOKENS": 16}


def with_parameters(nb, values: dict):
  """Rewrites the `NAME = ...` lines of the cell tagged `parameters`."""
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  source = cells[0].source
  for name, value in values.items():
    source, n = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value!r}  ", source, flags=re.M)
    assert n == 1, f"parameter {name} is not assigned in the parameters cell"
  cells[0].source = source
  return nb


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  # A kernel of this interpreter (not whatever `python3` kernel the machine has), on the CPU.
  kernelspec.write_kernel_spec(str(tmp_path / "kernels" / "lckv-jax-test"))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), CI_PARAMETERS)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="lckv-jax-test",
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  try:
    client.execute()  # raises CellExecutionError naming the failing cell
  finally:
    nbformat.write(nb, str(tmp_path / "quickstart.executed.ipynb"))
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "nothing to install" in outputs
  assert "held-out loss" in outputs and "relative logit error" in outputs
