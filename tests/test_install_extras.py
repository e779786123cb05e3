"""FAISS comes from exactly one extra: faiss-cpu and faiss-gpu-cu12 both install the `faiss`
package into the same folder, so an install holding both is a mix of two versions' files.
Read from pyproject.toml and from every install command in the repository."""

import re
from importlib.metadata import distributions

import pytest
from conftest import REPO
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
INSTALLERS = [REPO / "scripts" / "install.sh", REPO / "cluster" / "Dockerfile", REPO / "README.md",
              *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "scripts").glob("*.sh"))]


def _faiss(reqs: list[str]) -> set[str]:
    """The FAISS distributions among requirement strings (faiss, faiss-cpu, faiss-gpu, faiss-gpu-cu12...)."""
    return {name for r in reqs if (name := Requirement(r).name.lower()).startswith("faiss")}


def _faiss_extras() -> dict[str, set[str]]:
    return {extra: _faiss(reqs) for extra, reqs in PYPROJECT["optional-dependencies"].items() if _faiss(reqs)}


def test_faiss_is_in_two_extras_and_never_in_the_base_dependencies():
    assert not _faiss(PYPROJECT["dependencies"]), "a base faiss would sit beside the gpu extra's"
    assert _faiss_extras() == {"cpu": {"faiss-cpu"}, "gpu": {"faiss-gpu-cu12"}}


def _installed_extras(text: str) -> list[set[str]]:
    """The extras of every `pip install ... .[a,b]` / `pogdiff_dist[a,b]` in a file; a shell
    variable stands for each value its `case` admits (scripts/install.sh's FAISS_EXTRA)."""
    admitted = {m.group(1): set(re.findall(r"^\s*(\w+)\)", m.group(2), re.MULTILINE))
                for m in re.finditer(r'case "\$(\w+)" in(.*?)esac', text, re.DOTALL)}
    out = []
    for m in re.finditer(r"(?:\.|pogdiff_dist)\[([^\]]+)\]", text):
        names = [n.strip() for n in m.group(1).split(",")]
        variables = [n for n in names if n.startswith("$")]
        fixed = {n for n in names if not n.startswith("$")}
        if not variables:
            out.append(fixed)
        for v in variables:
            values = admitted.get(v.strip("${}"))
            assert values, f"{m.group(0)}: no `case` says which extras ${v} may be"
            out.extend(fixed | {value} for value in values)
    return out


@pytest.mark.parametrize("path", INSTALLERS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_install_command_selects_both_faiss_extras(path):
    faiss_extras = set(_faiss_extras())
    for extras in _installed_extras(path.read_text()):
        both = extras & faiss_extras
        assert len(both) <= 1, f"{path.name} installs {sorted(both)}: two FAISS builds into one faiss folder"


def test_the_installers_pick_cpu_for_ci_and_gpu_for_the_cluster_image():
    install_sh = sorted(sorted(e) for e in _installed_extras((REPO / "scripts" / "install.sh").read_text()))
    assert install_sh == [["cpu", "test"], ["gpu", "test"]]
    assert 'FAISS_EXTRA=${FAISS_EXTRA:-cpu}' in (REPO / "scripts" / "install.sh").read_text()  # CI: faiss-cpu
    assert _installed_extras((REPO / "cluster" / "Dockerfile").read_text()) == [{"gpu"}]
    pins = {line.split("==")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert {"faiss-cpu", "faiss-gpu-cu12"} <= pins  # each extra resolves to one pinned version


def test_this_environment_holds_one_faiss_build():
    installed = {d.metadata["Name"].lower() for d in distributions() if d.metadata["Name"].lower().startswith("faiss")}
    assert len(installed) == 1, installed
