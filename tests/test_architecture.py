"""The layout rules of docs/architecture.md: no import cycles, one door to torch_xla, one pipeline."""

import ast
from pathlib import Path

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
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == {name for name, path in _modules().items() if path.name == "__init__.py"}
