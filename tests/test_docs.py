"""The documentation site builds without a warning (the code blocks run through conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links, missing nav pages, snippets or docstrings fail ``mkdocs build --strict``."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "reference" / "index.html").is_file()


def test_sphinx_roles_hook_leaves_plain_code() -> None:
    """Docstrings' :class:`~a.B` roles render as ``B`` in code, not as ``:class:`` text."""
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import sphinx_roles
    finally:
        sys.path.pop(0)
    html = ":class:<code>~seqlease.Sequence</code> and :meth:<code>lease</code> and <code>x</code>"
    assert sphinx_roles.on_page_content(html) == (
        "<code>Sequence</code> and <code>lease</code> and <code>x</code>"
    )
