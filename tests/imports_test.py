"""The import graph of lckv_jax: no cycles, and the core stands on nothing under `train/`.

The graph is read from the source (ast), so it sees the imports inside functions too, which a
run would reach only on some paths. `from a import b` counts as importing the module `a.b` when
that is a module, else `a`; importing a module's parent package first, as Python does, is not
an edge of its own (every package whose `__init__` imports its submodules would be a cycle).
The body of `if __name__ == "__main__":` is not counted either: it runs only when the file is a
script (`python -m lckv_jax.layer_types`), as the module `__main__`, which no module imports.
"""

import ast
import glob
import os
import re

from tests import ROOT

PACKAGE = "lckv_jax"


def _modules() -> dict[str, str]:
  """Every module of the package: dotted name -> file."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-len(".py")]
        name = rel.replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = \
            os.path.join(folder, f)
  return out


def _is_main_guard(node: ast.AST) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__"
                  for c in node.test.comparators))


def _imports(name: str, path: str, modules) -> set[str]:
  """The lckv_jax modules that module `name` imports, anywhere in its code."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()

  def visit(node):
    if _is_main_guard(node):
      return
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the package, up `level - 1` packages
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in sorted(modules.items())}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return sorted(out)


def test_the_package_has_no_import_cycles():
  assert cycles(import_graph()) == []


def test_the_core_does_not_stand_on_train():
  train = f"{PACKAGE}.train"
  found = {(m, d) for m, deps in import_graph().items() if not m.startswith(train)
           for d in deps if d == train or d.startswith(train + ".")}
  assert found == set(), sorted(found)


# What trains may import `train/`: train.py, study.py and the benchmarks that time or run
# training, and benchmarks.tables, whose study tables read the study's records with its code.
TRAINING_ENTRY_POINTS = {"train", "study", "benchmarks.train_speed",
                         "benchmarks.prefill_iterations", "benchmarks.tables"}


def test_only_training_entry_points_import_train():
  modules = _modules()
  scripts = {os.path.splitext(f)[0]: os.path.join(ROOT, f) for f in os.listdir(ROOT)
             if f.endswith(".py")}
  bench = os.path.join(ROOT, "benchmarks")
  scripts.update({f"benchmarks.{os.path.splitext(f)[0]}": os.path.join(bench, f)
                  for f in os.listdir(bench) if f.endswith(".py")})
  train = f"{PACKAGE}.train"
  found = {name for name, path in scripts.items()
           if any(d == train or d.startswith(train + ".") for d in _imports(name, path, modules))}
  assert "generate" in scripts and "benchmarks.decode_speed" in scripts
  assert found <= TRAINING_ENTRY_POINTS, sorted(found - TRAINING_ENTRY_POINTS)


def test_the_package_stands_alone():
  # Scripts import each other's public names only, never through sys.path; the core never
  # imports the benchmarks.
  for path in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")):
    with open(path) as f:
      source = f.read()
    assert "sys.path" not in source, path
    for module, names in re.findall(r"from benchmarks\.?(\w*) import ([^\n]+)", source):
      assert not any(n.strip().startswith("_") for n in names.split("#")[0].split(",")), path
  for path in glob.glob(os.path.join(ROOT, "lckv_jax", "**", "*.py"), recursive=True):
    with open(path) as f:
      assert not re.search(r"^\s*(from|import) benchmarks", f.read(), re.M), path


if __name__ == "__main__":
  graph = import_graph()
  for c in cycles(graph):
    print(" <-> ".join(c))
  for m, deps in graph.items():
    print(m, "->", ", ".join(sorted(deps)))
