"""The README's layer table as code: every module's imports (also those inside functions) read from its source,
and a failure when a module imports one from a layer above it, or a sibling layer it must not know, or when the
imports form a circle."""
import ast
import os

from tests.helpers import ROOT

# Lowest first. A module may import its own layer and the layers of lower rank; two layers of the same rank
# (data and models) never import each other.
LAYERS = [
    ("data", 0, ("lungct.data",)),
    ("models", 0, ("lungct.models", "lungct.ops", "lungct.sharding")),
    ("runtime", 1, ("lungct.runtime", "lungct.config_check", "lungct.checkpoint", "lungct.metrics",
                    "lungct.interpret", "lungct.viz", "lungct.inferers")),
    ("tasks", 2, ("lungct.tasks",)),
    ("modes", 3, ("lungct.train", "lungct.evaluate", "lungct.predict", "lungct.report")),
    ("main", 4, ("lungct.main",)),
]


def layer_of(module: str):
  for name, rank, prefixes in LAYERS:
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return name, rank
  raise AssertionError(f"{module} is in no layer: add it to the README's layer table and to LAYERS")


def modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "lungct")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
  assert not open(out.pop("lungct")).read().strip()   # the root package is empty: no layer of its own
  return out


def imports(path: str, module: str, known: set[str]) -> set[str]:
  """The lungct modules ``path`` imports anywhere in its source (``from lungct import x`` names lungct.x)."""
  tree = ast.parse(open(path).read(), path)
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return {m for m in out if m in known and m != module}


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {m: imports(p, m, set(mods)) for m, p in mods.items()}


def test_no_module_imports_from_a_layer_above_or_beside_it():
  wrong = []
  for module, deps in graph().items():
    name, rank = layer_of(module)
    for dep in deps:
      dname, drank = layer_of(dep)
      if drank > rank or (drank == rank and dname != name):
        wrong.append(f"{module} ({name}) imports {dep} ({dname})")
  assert not wrong, "\n".join(sorted(wrong))


def test_the_import_graph_has_no_circle():
  g = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph().items()}  # a package's parent
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(g[m]):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = "done"
  for m in sorted(g):
    if m not in state:
      visit(m, [m])
  assert not cycles, "\n".join(cycles)


def test_the_checks_can_fail():
  """The reader sees function-level and relative imports, and a made-up upward import is caught."""
  mods = modules()
  assert "lungct.config_check" in imports(mods["lungct.viz"], "lungct.viz", set(mods))   # inside a function
  assert layer_of("lungct.tasks.segment") == ("tasks", 2)
  name, rank = layer_of("lungct.runtime")
  assert layer_of("lungct.train")[1] > rank and layer_of("lungct.data.pipeline")[1] < rank
