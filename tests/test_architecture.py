"""The layout's rules, read from the source with ast (nothing is imported): so the circles cannot come back.

Every import of the product code (igds_fast/, and kernels/ and profiling/ under their import names
igds_fast.kernels / igds_fast.profiling) counts, the ones inside functions too:

* no import circle among the product's modules;
* the command line (igds_fast.cli) is imported by nothing but the entry points;
* the kernels import nothing from igds_fast but shared constants and errors;
* one step: the objective and the guidance heads are called from the guidance object only, never
  from a step (sampling/).
"""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = {"igds_fast": "igds_fast", "kernels": "igds_fast.kernels", "profiling": "igds_fast.profiling"}
ENTRY_POINTS = {"igds_fast.__main__"}
KERNEL_MAY_IMPORT = {"igds_fast.errors", "igds_fast.head_contract", "igds_fast.seeding"}


def product_modules() -> dict[str, str]:
    """{module name: file path} of the product code."""
    modules = {}
    for folder, package in ROOTS.items():
        for directory, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                relative = os.path.relpath(os.path.join(directory, name), os.path.join(REPO, folder))
                parts = relative[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join([package, *parts]).rstrip(".")] = os.path.join(directory, name)
    return modules


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The product modules `module` imports (relative imports resolved; `from pkg import sub` = pkg.sub)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c`: the deepest product module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_is_read_whole():
    graph = import_graph()
    assert "igds_fast.sampling.compiled.step" in graph and "igds_fast.kernels.guidance_head" in graph
    assert "igds_fast.sampling.step" in graph["igds_fast.sampling.eager"]  # relative imports resolved
    assert "igds_fast.kernels" in graph["igds_fast.sampling.fused"]  # the kernels' import name


def test_no_import_circle_in_the_product():
    found = circles(import_graph())
    assert found == [], f"import circles: {found}"


def test_nothing_but_the_entry_points_imports_the_command_line():
    graph = import_graph()
    offenders = sorted(
        module for module, targets in graph.items()
        if not module.startswith("igds_fast.cli") and module not in ENTRY_POINTS
        and any(target == "igds_fast.cli" or target.startswith("igds_fast.cli.") for target in targets)
    )
    assert offenders == [], f"domain modules importing the CLI: {offenders}"


def test_kernels_import_only_shared_constants_from_igds_fast():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("igds_fast.kernels"):
            outside = {t for t in targets if not t.startswith("igds_fast.kernels")} - KERNEL_MAY_IMPORT
            assert not outside, f"{module} imports {sorted(outside)}"


def test_steps_compute_guidance_only_through_the_guidance_object():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("igds_fast.sampling"):
            assert "igds_fast.guidance.objective" not in targets, module
            text = open(product_modules()[module], encoding="utf-8").read()
            assert "igds_objective" not in text and "image_guidance" not in text, module
