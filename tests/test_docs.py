"""The docs do not promise as future work what already exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _resolves(dotted: str) -> bool:
    """Whether ``vaelab.a.b.name`` names a module or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_doc_waits_for_a_name_that_exists(doc):
    """A sentence like "once `vaelab.x.y` exists" is stale as soon as vaelab.x.y is there."""
    text = " ".join(doc.read_text().split())
    stale = [m for m in re.findall(r"once `(vaelab(?:\.\w+)+)` exists", text) if _resolves(m)]
    assert not stale, f"{doc.name}: waits for {stale}, which exist"


def test_the_check_resolves_names():
    assert _resolves("vaelab.viz.generate.traverse_images") and not _resolves("vaelab.viz.generate.no_such_name")
