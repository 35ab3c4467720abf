"""MkDocs hook: show Sphinx roles in docstrings (:class:`~seqlease.Sequence`) as plain code.

seqlease's docstrings are Google style with reST cross-reference roles, which read well in
``help()`` and editors. mkdocstrings renders the role name as text (``:class:Sequence``); this
hook drops it, and like Sphinx shows only the last part of a ``~``-prefixed name.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):<code>(~?)([^<]+)</code>")


def _plain(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Rewrite every role in the page's HTML."""
    return _ROLE.sub(_plain, html)
