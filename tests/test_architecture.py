"""The layout rules of docs/architecture.md (no import cycles, one door to torch_xla, one pipeline) and what
pyproject.toml must declare for a plain install and the test command."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    """Module name -> file, for fx_shard/ and passes/ (installed as fx_shard.passes)."""
    found = {}
    for base, package in ((ROOT / "fx_shard", "fx_shard"), (ROOT / "passes", "fx_shard.passes")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports, at any level of the file (functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return out


def test_no_import_cycles():
    modules = _modules()
    edges = {name: {m for m in _imports(path, name, modules) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ re-exports its modules; an edge into a package stands for an edge into what it re-exports.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(edges[name]):
            if state.get(target) == 1 and not name.startswith(target + "."):
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_torch_xla_only_behind_the_xla_door():
    modules = _modules()
    users = sorted(
        name for name, path in modules.items()
        if any(m == "torch_xla" or m.startswith("torch_xla.") for m in _imports(path, name, modules))
    )
    assert users == ["fx_shard.xla"]


def test_one_pipeline_assembly():
    """Only pipeline.py names the pipeline's passes; every other caller (benchmarks too) runs a Pipeline."""
    from fx_shard.pipeline import PASSES

    pass_names = {cls.__name__ for cls, _ in PASSES}
    assemblers = []
    for path in [*ROOT.joinpath("fx_shard").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Name) and n.id in pass_names for n in ast.walk(tree)):
            assemblers.append(path.relative_to(ROOT).as_posix())
    assert assemblers == ["fx_shard/pipeline.py"]


def test_no_style_name_spelled_outside_the_styles():
    """Styles are units: their names appear as string literals only in fx_shard/styles/ (and built-in plans, which are data)."""
    import fx_shard

    names = set(fx_shard.STYLES)
    spelled = []
    for path in [*ROOT.joinpath("fx_shard").rglob("*.py"), *ROOT.joinpath("passes").rglob("*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(("fx_shard/styles/", "fx_shard/models/plans.py")):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                spelled.append(f"{relative}:{node.lineno} {node.value!r}")
    assert not spelled, "\n".join(spelled)


def test_every_package_is_installed():
    """pyproject.toml lists each package folder, or a regular install would leave it out."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert listed == {name for name, path in _modules().items() if path.name == "__init__.py"}


def _pyproject() -> dict:
    import tomllib  # Python 3.11+

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> tuple[list, dict[str, list]]:
    """pyproject.toml's dependencies and optional dependencies, as ``packaging`` requirements."""
    project = _pyproject()["project"]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    return [Requirement(r) for r in project["dependencies"]], extras


def test_packages_the_tests_import_are_installed_by_the_test_command():
    """Every third-party module tests/ imports comes from a dependency or the ``test`` extra (what
    ``pip install -e ".[test]"`` installs), not from whatever else the machine happens to have."""
    canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    dependencies, extras = _requirements()
    declared = {canonical(r.name) for r in [*dependencies, *extras["test"]]}
    local = {"fx_shard", "tests", "benchmarks"} | {p.stem for p in (ROOT / "tests").rglob("*.py")}
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for top in {n.split(".")[0] for n in names} - local - set(sys.stdlib_module_names):
                if not {canonical(d) for d in distributions.get(top, [top])} & declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported by tests, in neither dependencies nor the test extra: {sorted(missing)}"


def test_test_extra_pins_the_torchvision_built_for_the_pinned_torch():
    """timm needs torchvision. Unpinned, pip tries the newest torchvision first, each release wanting another
    torch than the pinned one, and backtracks through them; pinned to the one built for our torch, it does not."""
    dependencies, extras = _requirements()
    torch = next(r for r in dependencies if r.name == "torch")
    vision = next((r for r in extras["test"] if r.name == "torchvision"), None)
    assert vision is not None, "the test extra does not pin torchvision"
    assert str(vision.specifier) == f"=={importlib.metadata.version('torchvision')}"
    wants = [Requirement(r) for r in importlib.metadata.requires("torchvision")]
    assert next(r.specifier for r in wants if r.name == "torch") == torch.specifier


def test_tpu_extra_is_torch_xlas_own_for_the_pinned_version():
    """``pip install -e ".[tpu]"`` pulls torch_xla's ``tpu`` extra (libtpu) of the torch_xla fx_shard pins."""
    dependencies, extras = _requirements()
    torch_xla = next(r for r in dependencies if r.name == "torch_xla")
    assert [(r.name, r.extras, r.specifier) for r in extras["tpu"]] == [("torch_xla", {"tpu"}, torch_xla.specifier)]
    assert "tpu" in importlib.metadata.metadata("torch_xla").get_all("Provides-Extra")
