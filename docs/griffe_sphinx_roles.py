"""Griffe extension for the API reference: Sphinx roles in fedmed's docstrings become code spans.

fedmed's docstrings use reStructuredText roles (``:class:`~fedmed.data.Pipeline```,
``:meth:`Strategy.configure_fit```) and double-backquoted literals. mkdocstrings renders Markdown,
where those would show as raw text; this turns them into Markdown code spans (``Pipeline``,
``Strategy.configure_fit``) before the docstrings are parsed. The source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj|const|term):`(~?)([^`<]+?)(?:\s*<[^>]*>)?`")
LITERAL = re.compile(r"``(.+?)``")


def convert(text: str) -> str:
    def role(m: re.Match) -> str:
        tilde, target = m.group(1), m.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")
        return f"`{shown}`"

    return LITERAL.sub(lambda m: f"`{m.group(1)}`", ROLE.sub(role, text))


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: Any = None, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
