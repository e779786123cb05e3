"""The layout's rules, read from the source: distribution lives in a few named modules,
MLflow in tracking/ alone, and no module grows past 400 lines."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "pogdiff_dist"

# module (dotted, under pogdiff_dist) -> the distribution libraries it may import
ALLOWED = {
    "ray": {"runtime", "prepare.pipeline", "prepare.join", "train.worker", "train.driver", "tuning.driver", "tuning.trial",
            "evaluation.generate"},
    "deepspeed": {"train.engine"},
    "torch.distributed": {"train.state"},
    "mlflow": {"tracking.runs", "tracking.compare", "tracking.model", "tracking.model_code"},
}
# model, loss and data code: none of the above, not even through a lazy import
PURE = ("models", "losses", "losses_flow", "timesteps", "families", "pipeline", "train.step", "data.", "config",
        "evaluation.metrics", "evaluation.features", "evaluation.scoring", "evaluation.report", "evaluation.judges")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        yield name, path


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _uses(imports: set[str], lib: str) -> bool:
    return any(i == lib or i.startswith(lib + ".") for i in imports)


@pytest.mark.parametrize("lib", sorted(ALLOWED))
def test_distribution_and_tracking_imports_stay_in_their_modules(lib):
    users = {name for name, path in _modules() if _uses(_imports(path), lib)}
    assert users <= ALLOWED[lib], f"{lib} imported outside {sorted(ALLOWED[lib])}: {sorted(users - ALLOWED[lib])}"
    assert users, f"nothing imports {lib}: the table is stale"


def test_model_loss_and_data_code_import_no_distribution():
    for name, path in _modules():
        if name.startswith(PURE) or name in PURE:
            bad = [lib for lib in ALLOWED if _uses(_imports(path), lib)]
            assert not bad, f"pogdiff_dist.{name} imports {bad}"


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_no_folder_named_like_build_output():
    """Tools skip dist/, build/ and the like by default (ruff, black, the Python .gitignore)."""
    skipped = {"dist", "build", "out", "site-packages", "node_modules", "venv"}
    assert not [p for p in PACKAGE.rglob("*") if p.is_dir() and p.name in skipped]


def _package_edges() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside a function."""
    modules = {name for name, _ in _modules()}
    edges: dict[str, set[str]] = {}
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in targets if t.removeprefix("pogdiff_dist.") in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("pogdiff_dist.") and t.removeprefix("pogdiff_dist.") in modules:
                    edges.setdefault(name, set()).add(t.removeprefix("pogdiff_dist."))
    return edges


def test_the_module_graph_has_no_cycle_even_through_function_level_imports():
    """A function-level import can hide a cycle that a top-level one would show at import
    time; both count here."""
    edges = _package_edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_unet_preset_names_in_the_config_are_the_models():
    from pogdiff_dist.config.sections import UNET_PRESET_NAMES
    from pogdiff_dist.models import UNET_PRESETS

    assert set(UNET_PRESET_NAMES) == set(UNET_PRESETS)
