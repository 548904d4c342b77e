"""The package's shape: every import points down. Read from the source (top-level and function-level imports
alike, since a lazy import is a dependency too), so a cycle or a config that reaches into the job fails here."""
import ast
import os

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "tgrpo")


def _imports() -> dict[str, set[str]]:
    graph = {}
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py"):
            continue
        module = name[:-3]
        tree = ast.parse(open(os.path.join(PACKAGE, name)).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "tgrpo":
                    found |= {alias.name for alias in node.names}
                elif node.module.startswith("tgrpo."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tgrpo.")}
        graph[module] = found - {module, "__init__"}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    assert set().union(*graph.values()) <= set(graph), "an import of a module that does not exist"
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


def test_the_config_and_the_errors_are_leaves():
    graph = _imports()
    assert graph["errors"] == set()
    assert graph["config"] == {"errors"}
    assert graph["buckets"] == set()  # the weight layouts: tensors only
    assert graph["algorithm"] == set()  # the pure algorithm
