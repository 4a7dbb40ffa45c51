"""The package's imports form a tree (a DAG) and respect a declared order of subpackages: every import of an
imgcls_dist module counts, at module level and inside functions, so a cycle cannot hide behind a lazy import.
The cycle check leaves `if TYPE_CHECKING:` blocks out (they never run); the layering check counts them."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "imgcls_dist"
TESTS = ROOT / "tests"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str], type_checking: bool = False) -> set[str]:
    """imgcls_dist modules `path` imports (a `from pkg import name` counts pkg.name when that is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    # My own ancestor packages have started initializing before I am loaded, so importing a sibling submodule
    # does not run them again: that implicit edge is no dependency. (An explicit `from pkg import name` of
    # something pkg/__init__ defines still counts: it is in `found` as pkg itself.)
    mine = {".".join(me.split(".")[:i]) for i in range(1, len(me.split(".")))}
    out = set()
    for name in found:
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = name.split(".")
        out.add(name)
        out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in mine)
    return {m for m in out if m in modules and m != me}


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports; `type_checking`: `if TYPE_CHECKING:` imports count too."""
    paths = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules, type_checking) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


# The subpackages (and top-level modules) in layers, lowest first: a module may import its own subpackage and
# anything in a lower layer, never a higher layer or another subpackage of its own layer. Type-only imports
# count here too: a layer that needs another's types belongs above it.
LAYERS = [
    {"errors", "console", "ports", "table"},
    {"storage", "ray_utils", "preemption"},
    {"config"},
    {"data"},
    {"models"},
    # MLflow: the tracking server, runs of train/tune/study, report logging, `models:/` URIs resolved to files
    # (the predictor's manifest reader resolves them, so this sits below it)
    {"tracking"},
    {"predictor"},  # the Ray-free ensemble + TTA predictor, its inputs and the ensemble manifest
    # ONNX export: builds its graphs from the predictor's members (and checks against the predictor), with
    # models' preprocessing inside; needs nothing that runs Ray, and nothing runs it but the CLI
    {"export", "register"},  # register: --models as an MLflow pyfunc model around the predictor
    {"batch"},  # the Ray Data batch job
    {"evaluate"},
    {"ensemble"},
    {"train", "serve"},
    {"tune"},
    {"study"},  # repeated-seed comparisons of config arms, run as Tune grids
    {"demo"},
    {"cli"},
]


def unit_of(module: str) -> str:
    """imgcls_dist.a.b -> a; the package itself -> its __init__'s unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layering_violations(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    rank = {u: i for i, layer in enumerate(layers) for u in layer}
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            ua, ub = unit_of(a), unit_of(b)
            if ua == ub or "__init__" in (ua, ub):
                continue
            if ua not in rank or ub not in rank:
                bad.append(f"{a} -> {b}: {ua if ua not in rank else ub} is in no layer (tests/unit/test_imports.py)")
            elif rank[ub] >= rank[ua]:
                bad.append(f"{a} -> {b}: {ua} may not import {ub}")
    return bad


def test_subpackages_import_only_lower_layers():
    graph = import_graph(type_checking=True)
    assert layering_violations(graph, LAYERS) == []


def test_the_layering_check_reports_a_back_edge_and_a_same_layer_edge():
    graph = import_graph(type_checking=True)
    back = {**graph, "imgcls_dist.predictor.predictor": graph["imgcls_dist.predictor.predictor"] |
            {"imgcls_dist.batch.pipeline"}}
    assert layering_violations(back, LAYERS) == [
        "imgcls_dist.predictor.predictor -> imgcls_dist.batch.pipeline: predictor may not import batch"]
    side = {"imgcls_dist.train.job": {"imgcls_dist.serve.local"}}
    assert layering_violations(side, LAYERS) == ["imgcls_dist.train.job -> imgcls_dist.serve.local: train may not "
                                                 "import serve"]
    # a type-only import is an edge for the layering
    assert "imgcls_dist.predictor.predictor" in import_graph(type_checking=True)["imgcls_dist.batch.stages"]


def test_package_imports_form_a_dag():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walker_sees_function_level_imports_and_reports_cycles():
    graph = import_graph()
    # cli imports its subcommands inside functions; those edges must be in the graph
    assert "imgcls_dist.train.job" in graph["imgcls_dist.cli"]
    # a package __init__ importing its submodules is an edge; those submodules importing siblings is not one back
    assert "imgcls_dist.serve.deployment" in graph["imgcls_dist.serve"]
    assert "imgcls_dist.serve" not in graph["imgcls_dist.serve.deployment"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


PROBE = """
import json, sys, urllib.request

calls = []


def offline(self, url, *a, **k):
    calls.append(str(getattr(url, "full_url", url)))
    raise OSError("no network in this probe")


urllib.request.OpenerDirector.open = offline
import imgcls_dist.data.augment  # what every Train worker, decode task and predictor actor loads
print(json.dumps({"albumentations": "albumentations" in sys.modules, "calls": calls}))
"""


def test_loading_the_augmentation_stack_makes_no_network_request():
    """albumentations' own update check asks pypi.org at every import unless told not to: every worker process
    would phone out (and wait on a cluster without internet)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"albumentations": True, "calls": []}, got


def test_what_the_gpu_check_runs_imports_no_ray():
    """tools/gpu_check.sh runs the device-decode, device-feed and predictor tests and the GPU bench on a machine
    with a CUDA GPU, which need not have Ray installed: none of it may import Ray."""
    probe = ("import sys; import benchmarks.gpu_bench, imgcls_dist.predictor.device_decode, "
             "imgcls_dist.predictor.decode_mode, imgcls_dist.predictor.device_feed, imgcls_dist.predictor.predictor, "
             "imgcls_dist.predictor.prepare, imgcls_dist.data.synthetic, imgcls_dist.data.builtin; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_gpu_checks_tests_collect_without_pytest_xdist():
    """tools/gpu_check.sh runs pytest in an environment that may lack pytest-xdist: the suite's xdist hooks must
    be optional for a pytest without xdist (pytest refuses an unknown hook at collection, and the check would
    lose its test run)."""
    modules = sorted(set(re.findall(r"tests/[\w/]+\.py", (ROOT / "tools" / "gpu_check.sh").read_text())))
    assert "tests/unit/test_device_decode.py" in modules, modules
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts=",
                          "--collect-only", "-q", *modules], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tests collected" in out.stdout


def test_no_test_module_imports_another_test_module_or_conftest():
    """Shared test code lives in tests/helpers/ and is imported as `helpers.X`: a test module importing
    another would run that module's fixtures and module-level code twice, under two names, and a helper
    imported by its bare name only resolves where the test's own directory happens to be on sys.path.
    Imports inside functions count."""
    helpers = {p.stem for p in (TESTS / "helpers").glob("*.py")} - {"__init__"}
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                    if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"
                    or n.split(".")[0] in helpers]
    assert bad == []
