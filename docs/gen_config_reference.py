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


#: what a key means where its file gives no trailing comment (keys that carry one keep their own)
MEANINGS = {
    "seed": "seeds partitions, initial weights, sampling and training: the same seed gives the same run",
    "splits": "the splits to decode and check",
    "output_dir": "where heatmap PNGs and numbers are written (also logged to MLflow)",
    "data.batch_size": "images per training step at each site",
    "data.cache_dir": "decoded, preprocessed samples kept between runs (disk cache)",
    "data.image_size": "side of the model's input image, in pixels (or voxels)",
    "data.in_channels": "channels of the model's input (1 grey, 3 colour)",
    "data.name": "the dataset's name (MLflow tags, manifest folders, checks against a checkpoint)",
    "data.num_classes": "classes the model predicts",
    "data.spatial_dims": "2 for images, 3 for volumes",
    "data.source.class_names": "class names in label order",
    "data.source.file": "the .npz file under the source's root",
    "data.source.group_column": "samples sharing this column's value stay in one split (e.g. one lesion)",
    "data.source.image_key": "the array of images per split in the .npz (`{split}` is replaced)",
    "data.source.image_root": "folder the table's image paths are relative to (null: the root)",
    "data.source.label_column": "the table column holding the label",
    "data.source.label_key": "the array of labels per split in the .npz (`{split}` is replaced)",
    "data.source.name": "the source's name (the dataset's)",
    "data.source.path_column": "the table column holding each image's path",
    "data.source.path_template": "how a table row becomes a file path (`{}`: the path column as it is)",
    "data.source.root": "the folder that holds this dataset (under FEDMED_DATA_DIR)",
    "data.source.split_column": "the table column naming each row's split (null: fedmed splits it)",
    "data.source.split_seed": "seeds the train/val/test split fedmed draws where the data has none",
    "data.source.splits.test": "the folder of test images",
    "data.source.splits.train": "the folder of training images",
    "data.source.table": "the metadata table (CSV) under the root",
    "data.source.test_fraction": "share of the samples held out as the test split where the data has none",
    "data.source.val_fraction": "share of the training samples held out for validation where the data has none",
    "data.transforms.augment.affine_prob": "probability of a random rotation/zoom per training image",
    "data.transforms.augment.brightness": "largest random brightness shift (training only)",
    "data.transforms.augment.brightness_prob": "probability of a brightness shift per training image",
    "data.transforms.augment.contrast_gamma": "largest random gamma change (training only)",
    "data.transforms.augment.contrast_prob": "probability of a contrast change per training image",
    "data.transforms.augment.cutout_holes": "square holes cut out of a training image",
    "data.transforms.augment.cutout_prob": "probability of a cutout per training image",
    "data.transforms.augment.cutout_size": "side of each cutout hole, in pixels",
    "data.transforms.augment.flip_prob": "probability of a horizontal flip per training image",
    "data.transforms.augment.rotate_degrees": "largest random rotation, in degrees (training only)",
    "data.transforms.augment.zoom": "largest random zoom, as a fraction (training only)",
    "data.transforms.channels": "channels the images are converted to (1 grey, 3 RGB)",
    "data.transforms.denoise_radius": "radius of the denoising filter, in pixels",
    "data.transforms.denoise_sigma": "strength of the denoising filter",
    "data.transforms.gamma": "intensity gamma applied to every image (1: none)",
    "data.transforms.intensity": "how intensities are scaled (minmax, zscore, ...)",
    "data.transforms.orientation": "axis codes volumes are reoriented to (NIfTI)",
    "data.transforms.size": "side every image is resized to, in pixels",
    "federation.local_epochs": "epochs each site trains per round",
    "federation.rounds": "rounds of the federation",
    "federation.select": "which round's model is kept (validation only, never test)",
    "federation.server": "host:port the server listens on (fedmed serve) or the sites connect to",
    "federation.sites": "the sites of the federation (configs/site/<name>.yaml each)",
    "logger.artifact_location": "where MLflow keeps the runs' files (figures, models, checkpoints)",
    "logger.experiment": "the MLflow experiment the runs are logged to",
    "logger.log_model": "log the selected model as an MLflow pyfunc (raw images in, class probabilities out)",
    "logger.tracking_uri": "the MLflow store (a SQLite file, or a tracking server's URL)",
    "model.logit_adjust": "logit adjustment by the site's label prior (0: plain cross-entropy)",
    "model.decorrelation": "weight of the penalty on correlated penultimate features (0: off; not with DP-SGD)",
    "model.freeze_head": "keep the last linear layer at its initial weights: only the body trains",
    "model.fix_batchnorm_from": "epoch from which BatchNorm trains with its running statistics, frozen (null: off)",
    "model.name": "the network's name (MLflow tags and run names)",
    "model.net.block_config": "dense layers in each DenseNet block",
    "model.net.dropout": "dropout before the classifier",
    "model.net.growth_rate": "feature maps each DenseNet layer adds",
    "model.net.hidden": "width of the hidden fully connected layer",
    "model.net.image_size": "input side the network is built for",
    "model.net.in_channels": "input channels (from the data)",
    "model.net.init_features": "feature maps of the DenseNet stem",
    "model.net.norm_groups": "groups of GroupNorm where BatchNorm is replaced (DP-SGD)",
    "model.net.num_classes": "classes the network predicts (from the data)",
    "model.net.spatial_dims": "2D or 3D layers (from the data)",
    "model.optimizer.lr": "learning rate at every site",
    "model.optimizer.min_lr_ratio": "cosine schedule: the last learning rate as a share of the first",
    "model.optimizer.sam_rho": "radius of sharpness-aware minimisation around the optimizer (0: off; not with DP-SGD)",
    "model.optimizer.schedule": "learning rate over the planned epochs: constant or cosine",
    "model.optimizer.weight_decay": "L2 weight decay",
    "partition.alpha": "Dirichlet concentration: smaller is more skewed (unused here)",
    "partition.column": "the metadata column whose values are the sites",
    "partition.dirname": "the folder of this partition's manifests (one JSON per site)",
    "partition.method": "how samples are shared among sites",
    "partition.min_samples": "redraw until every site has at least this many training samples",
    "site.name": "the site's name, as in federation.sites",
    "trainer.deterministic": "deterministic algorithms (slower; for bit-identical reruns)",
    "trainer.devices": "devices per site trainer",
    "trainer.limit_train_batches": "share (or number) of training batches per epoch",
    "trainer.limit_val_batches": "share (or number) of validation batches (null: all)",
    "trainer.precision": "Lightning's numeric precision",
}


def load_tables() -> list[Table]:
    """Every config file's table; a key without its own comment takes its meaning from :data:`MEANINGS`,
    else from another file that comments it."""
    tables = [read_table(p) for p in sorted(CONFIGS.rglob("*.yaml"))]
    commented = {r.key: r.meaning for t in tables for r in t.rows if r.meaning}
    for t in tables:
        for r in t.rows:
            if not r.meaning:
                r.meaning = MEANINGS.get(r.key) or commented.get(r.key, "")
    return tables


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
