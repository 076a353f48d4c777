"""The Changelog page: ``CHANGELOG.md`` from the repository root, added to the site at build time.

MkDocs runs this file as a hook (``hooks:`` in ``mkdocs.yml``). Links in the changelog are written
relative to the repository root (``docs/datasets.md``); they are rewritten relative to the site.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = "changelog.md"


def render() -> str:
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
