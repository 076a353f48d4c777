"""The configuration reference, generated from ``configs/`` so that it cannot drift from it.

Every YAML file under ``configs/`` becomes one table: the key as it is overridden on the command
line, its type (read from the value), its default, and its meaning (the trailing ``# comment`` of
the key's line, with aligned comment lines below it). Keys without a comment are listed at the end
of the page so that they can be filled in.

MkDocs runs this file as a hook (``hooks:`` in ``mkdocs.yml``): the page is added to the site at
build time as ``reference/config.md`` and never written to ``docs/``. The same hook checks that the
strategies page has a row for every ``configs/strategy/*.yaml``. To look at the page without
MkDocs::

    python docs/gen_config_reference.py > /tmp/config.md
"""

from __future__ import annotations

import html
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PAGE = "reference/config.md"
STRATEGIES_PAGE = "user-guide/strategies.md"

#: the primary config of each verb
VERBS = {
    "fit": "fedmed fit",
    "serve": "fedmed serve",
    "explain": "fedmed explain",
    "audit_privacy": "fedmed audit privacy",
    "data_check": "fedmed data check",
}

log = logging.getLogger("mkdocs.plugins.fedmed.config_reference")


@dataclass
class Row:
    key: str
    type: str
    default: str
    meaning: str


@dataclass
class Table:
    path: Path
    title: str
    about: list[str] = field(default_factory=list)
    defaults: list[tuple[str, str]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    package_global: bool = False


# -- reading one file ------------------------------------------------------------------------------


def comment_start(line: str) -> int | None:
    """Column of the ``#`` that starts a comment on this line (outside quotes), or None."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
    return None


def trailing_comment(lines: list[str], lineno: int) -> str:
    """The comment on line ``lineno`` after its content, plus the comment-only lines below it
    whose ``#`` is aligned with it (a comment continued over several lines)."""
    line = lines[lineno]
    col = comment_start(line)
    if col is None or not line[:col].strip():
        return ""
    parts = [line[col + 1:].strip()]
    for nxt in lines[lineno + 1:]:
        c = comment_start(nxt)
        if c != col or nxt[:c].strip():
            break
        parts.append(nxt[c + 1:].strip())
    return " ".join(p for p in parts if p)


def header(lines: list[str]) -> tuple[list[str], bool]:
    """The comment block at the top of a file, as paragraphs; and whether it is ``@package _global_``."""
    out: list[str] = []
    package_global = False
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        text = stripped[1:]
        if text.strip().startswith("@package"):
            package_global = "_global_" in text
            continue
        out.append(text[1:] if text.startswith(" ") else text)
    return out, package_global


def scalar_type(node: yaml.ScalarNode) -> str:
    tag = node.tag.rsplit(":", 1)[-1]
    if tag == "str":
        if node.value == "???":
            return "mandatory"
        if "${" in node.value:
            return "interpolation"
    return {"null": "null", "bool": "bool", "int": "int", "float": "float"}.get(tag, "str")


def flow(node: yaml.Node) -> str:
    """A value as one line of YAML flow style."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag.endswith(":str") and node.style in ("'", '"'):
            return f"{node.style}{node.value}{node.style}"
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return "[" + ", ".join(flow(v) for v in node.value) + "]"
    return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in node.value) + "}"


def defaults_entry(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return ", ".join(f"{flow(k)}: {flow(v)}" for k, v in node.value)
    return flow(node)


def walk(node: yaml.MappingNode, prefix: str, lines: list[str], table: Table, top: bool = False) -> None:
    for key_node, value in node.value:
        key = f"{prefix}{key_node.value}"
        meaning = trailing_comment(lines, key_node.start_mark.line)
        if top and key_node.value == "defaults" and isinstance(value, yaml.SequenceNode):  # Hydra's defaults list
            for item in value.value:
                table.defaults.append((defaults_entry(item), trailing_comment(lines, item.start_mark.line)))
            continue
        if isinstance(value, yaml.MappingNode):
            if meaning or not value.value:
                table.rows.append(Row(key, "mapping", "" if value.value else "{}", meaning))
            walk(value, key + ".", lines, table)
        elif isinstance(value, yaml.SequenceNode):
            table.rows.append(Row(key, "list", flow(value), meaning))
        elif key_node.value == "_target_":  # Hydra: the class instantiated with the keys beside it
            table.rows.append(Row(key, "class", value.value, meaning or "the class built from the keys beside it"))
        else:
            table.rows.append(Row(key, scalar_type(value), value.value, meaning))


def group_of(path: Path) -> str | None:
    rel = path.relative_to(CONFIGS)
    return rel.parts[0] if len(rel.parts) > 1 else None


def read_table(path: Path) -> Table:
    text = path.read_text()
    lines = text.splitlines()
    about, package_global = header(lines)
    rel = path.relative_to(CONFIGS)
    group = group_of(path)
    if group is None:
        verb = VERBS.get(path.stem, path.stem)
        title = f"`{verb}`"
    elif len(rel.parts) > 2:  # e.g. data/base/common.yaml: composed into the group's options, not one itself
        title = f"`{group}` base: {'/'.join(rel.parts[1:])}"
    else:
        title = f"`{group}={path.stem}`"
    table = Table(path, title, about, package_global=package_global)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if isinstance(root, yaml.MappingNode):
        prefix = "" if group is None or package_global else f"{group}."
        walk(root, prefix, lines, table, top=True)
    return table


# -- rendering -------------------------------------------------------------------------------------


def text_cell(s: str) -> str:
    """Comment text for Markdown: code spans kept; HTML, table pipes, emphasis and link brackets escaped."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", s)):
        if i % 2:
            out.append(part)
        else:
            out.append(re.sub(r"([|*\[\]_])", r"\\\1", html.escape(part, quote=False)))
    return "".join(out)


def code_cell(s: str) -> str:
    if s == "":
        return ""
    tick = "``" if "`" in s else "`"
    return f"{tick}{s}{tick}".replace("|", "\\|")


def about_markdown(about: list[str]) -> list[str]:
    """The header comment: prose joined into a paragraph, indented lines as a code block."""
    out: list[str] = []
    prose: list[str] = []
    code: list[str] = []

    def flush() -> None:
        if prose:
            out.extend([text_cell(" ".join(prose)), ""])
            prose.clear()
        if code:
            out.extend(["```", *code, "```", ""])
            code.clear()

    for line in about:
        if line.startswith("  "):
            if prose:
                flush()
            code.append(line.strip())
        elif line.strip():
            if code:
                flush()
            prose.append(line.strip())
        else:
            flush()
    flush()
    return out


def render_table(t: Table) -> list[str]:
    rel = t.path.relative_to(ROOT).as_posix()
    out = [f"### {t.title}", "", f"`{rel}`" + (" (`@package _global_`: keys are absolute)" if t.package_global
                                                else ""), ""]
    out += about_markdown(t.about)
    if t.defaults:
        out += ["Composes (its `defaults` list):", "", "| entry | meaning |", "|---|---|"]
        out += [f"| {code_cell(entry)} | {text_cell(meaning)} |" for entry, meaning in t.defaults]
        out.append("")
    if t.rows:
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for r in t.rows:
            out.append(f"| {code_cell(r.key)} | {r.type} | {code_cell(r.default)} | "
                       f"{text_cell(r.meaning) if r.meaning else '—'} |")
        out.append("")
    elif not t.defaults:
        out += ["No keys of its own.", ""]
    return out


def group_order(tables: list[Table]) -> list[str]:
    """Groups in the order ``fedmed fit`` composes them, then any others alphabetically."""
    order: list[str] = []
    for t in tables:
        if t.path == CONFIGS / "fit.yaml":
            for entry, _ in t.defaults:
                g = entry.split(":", 1)[0].strip()
                if (CONFIGS / g).is_dir() and g not in order:
                    order.append(g)
    rest = sorted({g for t in tables if (g := group_of(t.path)) and g not in order})
    return order + rest


def load_tables() -> list[Table]:
    return [read_table(p) for p in sorted(CONFIGS.rglob("*.yaml"))]


def render(tables: list[Table]) -> str:
    out = [
        "# Configuration reference",
        "",
        "Every key of every file under `configs/`, generated from the files themselves when this site "
        "is built. A key is set on the command line as written in the first column "
        "(`fedmed fit federation.rounds=20`); a file of a group is chosen by its option "
        "(`fedmed fit strategy=fedprox`), and then its keys apply (`strategy.mu=0.05`). "
        "`fedmed <verb> --cfg` prints the composed configuration of one command.",
        "",
        "Types are those of the default value: `null` is unset, `mandatory` (`???`) must be given, "
        "`interpolation` is computed from other keys (`${...}`, resolved when the config is composed).",
        "",
        "## Verbs",
        "",
        "The primary config of each verb: what it composes and its own keys.",
        "",
    ]
    primary = [t for t in tables if group_of(t.path) is None]
    known = [t for t in primary if t.path.stem in VERBS]
    known.sort(key=lambda t: list(VERBS).index(t.path.stem))
    for t in known + [t for t in primary if t.path.stem not in VERBS]:
        out += render_table(t)
    for g in group_order(tables):
        members = [t for t in tables if group_of(t.path) == g]
        options = ", ".join(f"`{t.path.stem}`" for t in members if t.path.parent.name == g)
        out += [f"## `{g}`", "", f"Options: {options}.", ""]
        # the group's own options first, then shared base files
        for t in sorted(members, key=lambda t: (t.path.parent.name != g, t.path.as_posix())):
            out += render_table(t)
    missing = [(t, r) for t in tables for r in t.rows if not r.meaning and r.type != "mapping"]
    out += ["## Keys without a comment", ""]
    if missing:
        out += [f"{len(missing)} keys have no trailing `# comment` in their file yet:", ""]
        for t in tables:
            keys = [r.key for tt, r in missing if tt is t]
            if keys:
                out.append(f"- `{t.path.relative_to(ROOT).as_posix()}`: " + ", ".join(f"`{k}`" for k in keys))
        out.append("")
    else:
        out += ["None: every key has a comment.", ""]
    return "\n".join(out)


# -- MkDocs hooks ----------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render(load_tables())))
    return files


def on_page_markdown(markdown, page, config, files):
    """The strategies page must have a table row for every ``configs/strategy/*.yaml``."""
    if page.file.src_uri == STRATEGIES_PAGE:
        for path in sorted((CONFIGS / "strategy").glob("*.yaml")):
            if not re.search(rf"^\|\s*`{re.escape(path.stem)}`\s*\|", markdown, re.MULTILINE):
                log.warning("%s has no table row for configs/strategy/%s (a row starting | `%s` |)",
                            STRATEGIES_PAGE, path.name, path.stem)
    return markdown


if __name__ == "__main__":
    sys.stdout.write(render(load_tables()))
