"""The package's shape: every import points down. Read from the source (top-level and function-level imports
alike, since a lazy import is a dependency too), so a cycle, an upward import or a config that reaches into the job
fails here.

The layers, lowest first: the shared leaves at the top of tgrpo/, then policy, sync, rollout, reward, job (tgrpo/__init__.py
and each package's docstring state the same order)."""
import ast
import os
import re

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "tgrpo")
LEAVES = {"config", "errors", "console", "algorithm", "batch", "data", "search_protocol", "tiny", "vision",
          "reward_spec"}
ORDER = ["policy", "sync", "rollout", "reward", "job"]  # each may import the leaves and the packages before it


def _modules() -> dict[str, str]:
    """'job.trainer' (or 'config' for a shared leaf) -> its file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(folder, PACKAGE)
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                dotted = name[:-3] if rel == "." else f"{rel.replace(os.sep, '.')}.{name[:-3]}"
                found[dotted] = os.path.join(folder, name)
    return found


def _imports() -> dict[str, set[str]]:
    modules = _modules()

    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("tgrpo."):
                base = node.module[len("tgrpo."):] if node.module != "tgrpo" else ""
                for alias in node.names:  # `from tgrpo.job import checkpoint` or `from tgrpo.job.checkpoint import x`
                    name = f"{base}.{alias.name}" if base else alias.name
                    found.add(name if name in modules or name in ORDER else base)
            elif isinstance(node, ast.Import):
                found |= {alias.name[len("tgrpo."):] for alias in node.names if alias.name.startswith("tgrpo.")}
        graph[module] = found - {module}
    return graph


def _layer(module: str) -> int:
    return 0 if "." not in module else 1 + ORDER.index(module.split(".")[0])


def test_every_import_names_a_module_that_exists():
    graph, modules = _imports(), set(_modules())
    unknown = {f"{m} -> {d}" for m, deps in graph.items() for d in deps if d not in modules}
    assert not unknown, f"imports of modules that do not exist (or of a package as a whole): {sorted(unknown)}"


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_every_import_points_down():
    """A module imports the shared leaves, its own package and the packages below it; a leaf imports only leaves."""
    up = sorted(f"{m} -> {d}" for m, deps in _imports().items() for d in deps if _layer(d) > _layer(m))
    assert not up, f"imports that point up ({' < '.join(['leaves'] + ORDER)}): {up}"


def test_only_the_shared_leaves_lie_at_the_top():
    top = {m for m in _modules() if "." not in m}
    assert top == LEAVES, (f"tgrpo/ holds {sorted(top - LEAVES)} beside the shared leaves: a module of a role goes "
                           f"into that role's package ({', '.join(ORDER)})")
    assert {m.split(".")[0] for m in _modules() if "." in m} == set(ORDER)


def test_the_config_and_the_errors_are_leaves():
    graph = _imports()
    assert graph["errors"] == set()
    assert graph["config"] == {"errors"}
    assert graph["console"] == set()  # what people see: every role writes to it
    assert graph["algorithm"] == set()  # the pure algorithm
    assert graph["search_protocol"] == set()  # the search tool's text
    assert graph["vision"] <= {"errors"}  # images: references, the processor's sizing
    assert graph["sync.buckets"] == set()  # the weight layouts: tensors only


def test_the_package_docstrings_state_the_order():
    """Each package's __init__ is its docstring alone (no forwarding of names: importing a package runs nothing),
    and its 'May import:' paragraph names exactly the packages below it."""
    for i, package in enumerate(ORDER):
        tree = ast.parse(open(os.path.join(PACKAGE, package, "__init__.py")).read())
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), f"tgrpo/{package}/__init__.py: code"
        doc = ast.get_docstring(tree)
        may = re.search(r"May import:(.*?)(?:Never|\Z)", doc, re.S)
        assert may, f"tgrpo/{package}/__init__.py does not say what it may import"
        named = set(re.findall(r"tgrpo\.(\w+)", may.group(1))) & set(ORDER)
        assert named == set(ORDER[:i]), f"tgrpo/{package}: its docstring names {sorted(named)}, the layers say " \
                                        f"{ORDER[:i]}"
    top = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, "__init__.py")).read()))
    assert [p for p in re.findall(r"^    (\w+)/", top, re.M)] == ORDER[::-1]
