"""The API reference (`make api`): pdoc builds the page of vaelab's public names from their
docstrings, offline, and the page loads nothing from the network."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pdoc = pytest.importorskip("pdoc", reason="pdoc is not installed: pip install -e .[docs]")


def test_pdoc_builds_the_api_reference_of_the_public_names(tmp_path):
    out = tmp_path / "api"
    subprocess.run([sys.executable, "-m", "pdoc", "vaelab", "--docformat", "restructuredtext", "-o", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    html = (out / "vaelab.html").read_text()
    for name in ("train", "evaluate_run", "load_run", "RunConfig", "ModelConfig", "write_report", "iwae_bound",
                 "complete_run", "EvalResult"):
        assert f'<section id="{name}">' in html, name
    assert "Write <code>RUN/report.html</code>" in html  # a docstring, rendered
    # nothing fetched when the page is opened: no script or stylesheet from elsewhere
    assert not re.search(r'<(script|link)[^>]+(src|href)="https?:', html)
