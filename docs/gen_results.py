"""The Results page, generated from the saved benchmark outputs in ``benchmarks/results/*.json``.

Each file holds one table: its title and section, the command that produced it, the date, the
machine, the seeds, the overrides that reproduce it with the current defaults (if it was measured
with other settings), the columns, the rows and a short note. ``benchmarks/results/README.md``
describes the format.

MkDocs runs this file as a hook (``hooks:`` in ``mkdocs.yml``): the page is added to the site at
build time as ``results.md`` and never written to ``docs/``. A file that does not follow the
format is a build warning (an error under ``mkdocs build --strict``). To look at the page without
MkDocs::

    python docs/gen_results.py > /tmp/results.md
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = "results.md"

#: the page's sections in this order; a section not listed here follows them, alphabetically
SECTIONS = [
    "PneumoniaMNIST: federated, centralized and each site alone",
    "Strategies under label skew and under attack (PneumoniaMNIST, 4 sites)",
    "Brain tumour MRI",
    "Skin lesions (HAM10000)",
    "Privacy",
    "Explanations",
    "Claims checked",
    "Speed",
]
REQUIRED = {"title": str, "section": str, "command": (str, list), "date": str, "machine": str, "seeds": list,
            "columns": list, "rows": list}
OPTIONAL = {"order": int, "setup": (str, type(None)), "reproduce": (str, type(None)), "note": (str, type(None))}
#: words that belong to a project's history, not to a results page
HISTORY = re.compile(r"\b(session|issue|the target|I|we|our)\b")

log = logging.getLogger("mkdocs.plugins.fedmed.results")


def problems(name: str, d: dict) -> list[str]:
    out = []
    for key, kind in REQUIRED.items():
        if key not in d:
            out.append(f"{name}: missing {key!r}")
        elif not isinstance(d[key], kind):
            out.append(f"{name}: {key!r} has the wrong type")
    for key, kind in OPTIONAL.items():
        if key in d and not isinstance(d[key], kind):
            out.append(f"{name}: {key!r} has the wrong type")
    for key in set(d) - set(REQUIRED) - set(OPTIONAL):
        out.append(f"{name}: unknown key {key!r}")
    if isinstance(d.get("date"), str) and not re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", d["date"]):
        out.append(f"{name}: date {d['date']!r} is not YYYY-MM or YYYY-MM-DD")
    cols = d.get("columns") or []
    for i, row in enumerate(d.get("rows") or []):
        if not isinstance(row, list) or len(row) != len(cols):
            out.append(f"{name}: row {i + 1} has {len(row) if isinstance(row, list) else '?'} cells, "
                       f"the table {len(cols)} columns")
    text = " ".join(str(d.get(k) or "") for k in ("title", "setup", "reproduce", "note"))
    if m := HISTORY.search(text):
        out.append(f"{name}: {m.group(0)!r} in its text: describe the result, not how it came about")
    return out


def load() -> tuple[list[tuple[str, dict]], list[str]]:
    tables, errors = [], []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            errors.append(f"{path.name}: not valid JSON ({exc})")
            continue
        errs = problems(path.name, d)
        errors += errs
        if not errs:
            tables.append((path.stem, d))
    return tables, errors


def cell(s: object) -> str:
    """A table cell: pipes outside code spans escaped."""
    parts = re.split(r"(`[^`]*`)", str(s))
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def render_table(name: str, d: dict) -> list[str]:
    out = [f"### {d['title']}", ""]
    if d.get("setup"):
        out += [d["setup"], ""]
    commands = d["command"] if isinstance(d["command"], list) else [d["command"]]
    out += ["```bash", *commands, "```", ""]
    if d.get("reproduce"):
        out += [f"**Reproduce with the current defaults**: add {d['reproduce']}.", ""]
    seeds = ", ".join(str(s) for s in d["seeds"]) or "—"
    out += [f"**Seeds** {seeds} · **Machine** {d['machine']} · **Date** {d['date']}", ""]
    out.append("| " + " | ".join(cell(c) for c in d["columns"]) + " |")
    out.append("|" + "---|" * len(d["columns"]))
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in d["rows"]]
    out.append("")
    if d.get("note"):
        out += [d["note"], ""]
    out += [f"<small>Data: `benchmarks/results/{name}.json`</small>", ""]
    return out


def render(tables: list[tuple[str, dict]]) -> str:
    out = [
        "# Results",
        "",
        "Every figure on this page is read from a saved benchmark output, `benchmarks/results/<name>.json`, "
        "when the documentation is built. Each table names the command that produced it, its seeds, the "
        "machine and the date.",
        "",
        "- Runs use fedmed's defaults unless the table says otherwise. A table measured with other settings "
        "names the overrides that reproduce it with the current defaults; for most of them that is "
        "`model.optimizer.keep_state=false data.transforms.augment.affine_prob=0` (a fresh site optimizer every "
        "round, no rotation/zoom augmentation).",
        "- `a ± b` is the mean and standard deviation over the seeds. Each seed draws its own partition.",
        "- Model selection uses validation data only (val ACC, validation loss); the test split is never used "
        "to select a model. Choose settings on validation, as the tables allow.",
        "- Federated results move by several points from seed to seed; a single run is not conclusive.",
        "- Times are wall-clock on the machine named and noisy; compare them within a table.",
        "",
    ]
    sections = sorted({d["section"] for _, d in tables},
                      key=lambda s: (SECTIONS.index(s) if s in SECTIONS else len(SECTIONS), s))
    for section in sections:
        out += [f"## {section}", ""]
        members = sorted(((n, d) for n, d in tables if d["section"] == section),
                         key=lambda nd: (nd[1].get("order", 0), nd[0]))
        for name, d in members:
            out += render_table(name, d)
    return "\n".join(out)


# -- MkDocs hook -----------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    tables, errors = load()
    for e in errors:
        log.warning("benchmarks/results/%s", e)
    files.append(File.generated(config, PAGE, content=render(tables)))
    return files


if __name__ == "__main__":
    tables, errors = load()
    for e in errors:
        print(f"warning: {e}", file=sys.stderr)
    sys.stdout.write(render(tables))
