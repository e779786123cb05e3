"""README and docs/: every relative link resolves, and every config key they name with
``--set key=`` or as ``section.key=`` in a command is a real key (so a copied command works)."""

import re

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SET_KEY = re.compile(r"--set[ =]([a-z_]+\.[a-z_0-9]+)=")


def _relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://|#|mailto:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_relative_link_resolves(doc):
    missing = [t for t in _relative_links(doc.read_text()) if not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, f"{doc.name}: links to nothing: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_set_key_is_a_config_key(doc):
    from pogdiff_dist.config import Config

    keys = set(Config().flat())
    named = set(SET_KEY.findall(doc.read_text()))
    unknown = sorted(named - keys - {"section.key"})  # the syntax placeholder
    assert not unknown, f"{doc.name}: --set of keys the config does not have: {unknown}"


def test_the_checks_see_something():
    """The patterns find the README's links and --set keys (a broken pattern would pass vacuously)."""
    text = (REPO / "README.md").read_text()
    assert _relative_links(text) and SET_KEY.findall(text)
