"""Benchmark table: levers against HAM10000's site shift, each beside pooled training on equal terms.

Every lever is a config option; each row is ``benchmarks/ham10000_sites.py`` run at seeds 42, 43, 44 with
``experiment=ham10000`` and that option (the commands are in the results file). This script only gathers
the runs' ``bench_out/<name>.json`` files into one table: pooled test balanced accuracy, macro-F1, AUROC,
each site's own test lesions, the validation balanced accuracy the levers are compared by (never the
test split), and the gap to centralized training with the same network and inputs.

A row whose runs are not in ``--bench-out`` (run on another machine or earlier) keeps the figures it has in
the results files, so new rows can be added to the table without running every other row again.

Usage:
    python benchmarks/ham10000_site_shift.py [--bench-out bench_out] \
        [--results benchmarks/results/ham10000_site_shift.json] \
        [--results-per-site benchmarks/results/ham10000_site_shift_per_site.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from results import ms

SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]

NO_POOLED = ("-", "-")  # a federated row without a pooled run on equal terms: no gap is given
#: (row name, bench_out file, run label in it, the pooled row it is compared with: (file, label) or None for the
#: reference centralized run of ham10000_natural_sites.json, overrides)
Row = tuple[str, str, str, tuple[str, str] | None, str]


PRESET = "experiment=ham10000_site_shift_128"
PRESET_POOLED = ("ham128r72", "centralized")  # the preset's pooled run at seeds 42-44
THREE_SITES = "federation.sites=[vidir_modern,vidir_molemax,vienna_dias]"


def against_preset(name: str, file: str, label: str, option: str) -> Row:
    """A federated row that changes only the sites or the server, compared with the preset's pooled run."""
    return (name, file, label, PRESET_POOLED, f"{PRESET} {option}")


def on_equal_terms(tag: str, pooled: str, federated: str, option: str) -> list[Row]:
    """Pooled training and FedAvg on the 128 px preset with ``option``, FedAvg compared with that pooled row
    (bench_out files ``<tag>_centralized`` and ``<tag>_fedavg``); ``pooled`` and ``federated`` end the row names."""
    return [(f"centralized {pooled}", f"{tag}_centralized", "centralized", None,
             f"{PRESET} mode=centralized {option}".strip()),
            (f"FedAvg {federated}", f"{tag}_fedavg", "fedavg", (f"{tag}_centralized", "centralized"),
             f"{PRESET} {option}".strip())]


ROWS: list[Row] = [
    ("FedAvg (reference, rerun)", "ham_ref", "fedavg", None, "-"),
    ("centralized, Shades of Gray", "ham_sog_centralized", "centralized", None,
     "data.transforms.colour=shades_of_gray"),
    ("FedAvg + Shades of Gray", "ham_sog_fedavg", "fedavg", ("ham_sog_centralized", "centralized"),
     "data.transforms.colour=shades_of_gray"),
    ("FedAvg + the federation's label prior", "ham_prior", "fedavg", None, "model.logit_prior=federation"),
    ("FedAvg + head calibration (every class sent)", "ham_calib", "fedavg", None,
     "federation.calibrate_head=true federation.calibrate_min_images=1"),
    ("FedAvg, selected by the sites' mean balanced accuracy", "ham_sitesel", "fedavg", None,
     "federation.select=best_val_site_balanced_acc"),
    ("centralized, EfficientNet-Lite0 from ImageNet", "ham_pre_centralized", "centralized", None,
     "model=efficientnet_lite0 model.pretrained=<weights>"),
    ("FedAvg, EfficientNet-Lite0 from ImageNet", "ham_pre_fedavg", "fedavg", ("ham_pre_centralized", "centralized"),
     "model=efficientnet_lite0 model.pretrained=<weights>"),
    # the combination of the levers whose validation balanced accuracy was above the reference's
    ("centralized, Shades of Gray + head calibration", "ham_combo_centralized", "centralized", None,
     "experiment=ham10000_site_shift mode=centralized"),
    ("FedAvg + Shades of Gray + head calibration", "ham_combo_fedavg", "fedavg",
     ("ham_combo_centralized", "centralized"), "experiment=ham10000_site_shift"),
    # each source alone with the same two levers: is the federation above every site on its own?
    *[(f"{site} alone, Shades of Gray + head calibration", "ham_combo_locals", f"local:{site}", None,
       f"experiment=ham10000_site_shift site={site}") for site in SITES],
    # the same recipe at 128 px (the 4-block CNN with a stride-2 stem): 24 rounds, then 72 (the preset)
    ("FedAvg + both levers, 128 px, 24 rounds", "ham128_fedavg", "fedavg", NO_POOLED,
     "experiment=ham10000_site_shift data.transforms.size=128"),
    ("centralized + both levers, 128 px, 72 rounds", "ham128r72", "centralized", None,
     "experiment=ham10000_site_shift_128 mode=centralized"),
    ("FedAvg + both levers, 128 px, 72 rounds", "ham128r72", "fedavg", ("ham128r72", "centralized"),
     "experiment=ham10000_site_shift_128"),
    *[(f"{site} alone, both levers, 128 px, 72 rounds", "ham128_locals", f"local:{site}", None,
       f"experiment=ham10000_site_shift_128 site={site}") for site in SITES],
    # the same 18 passes over each site's data split into fewer, longer rounds or more, shorter ones
    *[row for rounds, part, tag in ((36, 0.5, "ham128r36h"), (144, 0.125, "ham128r144e")) for row in (
        (f"centralized + both levers, 128 px, {rounds} rounds of {part} epoch", f"{tag}_centralized", "centralized",
         None,
         f"experiment=ham10000_site_shift_128 mode=centralized federation.rounds={rounds} "
         f"trainer.limit_train_batches={part}"),
        (f"FedAvg + both levers, 128 px, {rounds} rounds of {part} epoch", f"{tag}_fedavg", "fedavg",
         (f"{tag}_centralized", "centralized"),
         f"experiment=ham10000_site_shift_128 federation.rounds={rounds} trainer.limit_train_batches={part}"))],
    # two local quarter epochs per round (36 passes over each site's data), against the preset's pooled run
    against_preset("FedAvg + both levers, 128 px, 72 rounds of two quarter epochs", "ham128le2_fedavg", "fedavg",
                   "federation.local_epochs=2"),
    # server momentum (FedAvgM, beta 0.5) on the preset, against the preset's pooled run
    against_preset("FedAvgM (server momentum 0.5) + both levers, 128 px, 72 rounds", "ham128m5_fedavgm", "fedavgm",
                   "strategy=fedavgm strategy.server_momentum=0.5"),
    # weight averaging of the models of rounds (epochs) 55-72, pooled training averaged the same way: the mean
    # selectable by validation with the earlier rounds' models, or the final mean taken as it is
    *[row for select, tag, how in (("", "swa55", "selected by validation"),
                                   (" federation.select=last", "swa55last", "the final mean")) for row in (
        (f"centralized + both levers, 128 px, 72 rounds, mean of epochs 55-72 ({how})", f"{tag}_centralized",
         "centralized", None,
         f"experiment=ham10000_site_shift_128 mode=centralized federation.average_from=55{select}"),
        (f"FedAvg + both levers, 128 px, 72 rounds, mean of rounds 55-72 ({how})", f"{tag}_fedavg", "fedavg",
         (f"{tag}_centralized", "centralized"),
         f"experiment=ham10000_site_shift_128 federation.average_from=55{select}"))],
    # ImageNet-pretrained EfficientNet-Lite0 with both levers at 128 px, the 24 rounds of the 64 px recipe
    ("centralized, EfficientNet-Lite0 from ImageNet + both levers, 128 px, 24 rounds", "eff128_centralized",
     "centralized", None,
     "experiment=ham10000_site_shift mode=centralized data.transforms.size=128 model=efficientnet_lite0 "
     "model.pretrained=<weights>"),
    ("FedAvg, EfficientNet-Lite0 from ImageNet + both levers, 128 px, 24 rounds", "eff128_fedavg", "fedavg",
     ("eff128_centralized", "centralized"),
     "experiment=ham10000_site_shift data.transforms.size=128 model=efficientnet_lite0 model.pretrained=<weights>"),
    # levers on the body at 128 px (seed 42): the preset's pooled run again with the same install, then the
    # feature decorrelation penalty (federation only) and the frozen classifier layer (federation and pooled)
    ("centralized + both levers, 128 px, 72 rounds (run again with the install of the rows below)",
     "preset128_centralized", "centralized", None, "experiment=ham10000_site_shift_128 mode=centralized"),
    ("FedAvg + both levers + feature decorrelation (0.1), 128 px, 72 rounds", "dc01_fedavg", "fedavg",
     ("preset128_centralized", "centralized"), "experiment=ham10000_site_shift_128 model.decorrelation=0.1"),
    ("centralized + both levers, frozen classifier layer, 128 px, 72 rounds", "fh_centralized", "centralized", None,
     "experiment=ham10000_site_shift_128 mode=centralized model.freeze_head=true"),
    ("FedAvg + both levers, frozen classifier layer, 128 px, 72 rounds", "fh_fedavg", "fedavg",
     ("fh_centralized", "centralized"), "experiment=ham10000_site_shift_128 model.freeze_head=true"),
    # selection among head-calibrated models: every round's (epoch's) model from round 55 on is calibrated
    # before it is scored on validation
    ("centralized + both levers, 128 px, 72 rounds, selected among calibrated epochs 55-72", "cf55_centralized",
     "centralized", None, "experiment=ham10000_site_shift_128 mode=centralized federation.calibrate_from=55"),
    ("FedAvg + both levers, 128 px, 72 rounds, selected among calibrated rounds 55-72", "cf55_fedavg", "fedavg",
     ("cf55_centralized", "centralized"), "experiment=ham10000_site_shift_128 federation.calibrate_from=55"),
    # FedNova on the preset: each site's update divided by its number of local steps, against the preset's pooled run
    against_preset("FedNova + both levers, 128 px, 72 rounds", "nova128_fednova", "fednova", "strategy=fednova"),
    # a longer budget: 120 rounds (epochs) of a quarter epoch (the preset's time scaled by 120/72); the first 72 are
    # the preset's (a constant learning rate), so selection chooses among 48 more candidates
    *on_equal_terms("r120", "+ both levers, 128 px, 120 rounds", "+ both levers, 128 px, 120 rounds",
                    "federation.rounds=120"),
    # sharpness-aware minimisation (radius 0.05) at every site (FedSAM), and in pooled training
    *on_equal_terms("sam128", "+ both levers + SAM (0.05), 128 px, 72 rounds",
                    "+ both levers + SAM (0.05) at every site, 128 px, 72 rounds", "model.optimizer.sam_rho=0.05"),
    # BatchNorm trained with its running statistics from round (epoch) 37 on (FixBN), in the federation and in pooled
    # training
    *on_equal_terms("fixbn37", "+ both levers, BatchNorm fixed from epoch 37, 128 px, 72 rounds",
                    "+ both levers, BatchNorm fixed from round 37, 128 px, 72 rounds", "model.fix_batchnorm_from=37"),
    # each site's update weighed by its class-balanced share instead of its image count: a change at the server
    # only, so the preset's pooled run is its reference
    against_preset("FedAvg + both levers, class-balanced site weights, 128 px, 72 rounds", "bw_fedavg", "fedavg",
                   "federation.weighting=balanced"),
    # the learning rate on a half cosine from 0.001 down to 0.00005 over the 72 rounds (epochs) instead of constant,
    # in the federation and in pooled training; then the same pair again on seeds 45-47, which no lever was tried on
    *on_equal_terms("cos", "+ both levers, cosine learning rate, 128 px, 72 rounds",
                    "+ both levers, cosine learning rate, 128 px, 72 rounds", "model.optimizer.schedule=cosine"),
    *on_equal_terms("cosfresh", "+ both levers, cosine learning rate, 128 px, 72 rounds, fresh seeds",
                    "+ both levers, cosine learning rate, 128 px, 72 rounds, fresh seeds",
                    "model.optimizer.schedule=cosine"),
    # the preset itself on seeds 45-47, which no lever was tried on
    *on_equal_terms("fresh128", "+ both levers, 128 px, 72 rounds, fresh seeds",
                    "+ both levers, 128 px, 72 rounds, fresh seeds", ""),
    # the preset on four class-stratified IID shares of the same training and validation images: what averaging
    # costs without the site shift, against the preset's pooled run
    against_preset("FedAvg on four IID shares + both levers, 128 px, 72 rounds", "iid128_fedavg", "fedavg",
                   "partition=iid"),
    # every site's logit adjustment by the federation's summed label counts instead of its own: the sites' losses
    # then add up to pooled training's; a change at the sites only, so the preset's pooled run is its reference
    against_preset("FedAvg + both levers, the federation's label prior, 128 px, 72 rounds", "prior128_fedavg", "fedavg",
                   "model.logit_prior=federation"),
    # every site trains half its images under another site's look (the other sites' mean low-frequency amplitude
    # spectra, relayed by the server); a federation-only lever, so the preset's pooled run is its reference
    against_preset("FedAvg + both levers, style sharing (0.5), 128 px, 72 rounds", "style128_fedavg", "fedavg",
                   "federation.style_mix=0.5"),
    # external validation: rosendahl never trains (three sites, selection on their validation images) and its own
    # test lesions are scored; with and without style sharing, which is meant to carry to a look no site trained on
    ("FedAvg + both levers, 128 px, 72 rounds, three sites (rosendahl never trains)", "ext128_fedavg", "fedavg",
     NO_POOLED, f"{PRESET} {THREE_SITES}"),
    ("FedAvg + both levers, style sharing (0.5), 128 px, 72 rounds, three sites (rosendahl never trains)",
     "extstyle128_fedavg", "fedavg", NO_POOLED, f"{PRESET} {THREE_SITES} federation.style_mix=0.5"),
    # personalisation: after the preset's federation each site fine-tunes the final model for one pass over its
    # own training images (4 local epochs of a quarter) and keeps it; each site's model is scored on that site's
    # own lesions, all predictions together ("own"). Its control: the preset's pooled model fine-tuned at each
    # site the same way. The global model of the same federations is the preset again (same seeds).
    ("FedAvg + both levers, 128 px, 72 rounds: the global model before fine-tuning", "ft128_finetune", "finetune",
     ("ft128_centralized_finetune", "centralized_finetune"), f"{PRESET} federation.finetune_epochs=4"),
    ("FedAvg + both levers, 128 px, 72 rounds, fine-tuned at each site: each site's model on its own lesions",
     "ft128_finetune", "finetune:own", ("ft128_centralized_finetune", "centralized_finetune:own"),
     f"{PRESET} federation.finetune_epochs=4"),
    ("centralized + both levers, 128 px, 72 rounds: the pooled model before fine-tuning",
     "ft128_centralized_finetune", "centralized_finetune", None, f"{PRESET} mode=centralized"),
    ("centralized + both levers, 128 px, 72 rounds, fine-tuned at each site: each site's model on its own lesions",
     "ft128_centralized_finetune", "centralized_finetune:own", None,
     f"{PRESET} mode=centralized, then each site as federation.finetune_epochs=4"),
    # FedProx on the preset: each site's loss adds mu/2 ||w - w_global||^2; against the pooled run just above
    ("FedProx (mu 0.01) + both levers, 128 px, 72 rounds", "prox128_fedprox", "fedprox",
     ("ft128_centralized_finetune", "centralized_finetune"), f"{PRESET} strategy=fedprox"),
]
#: the reference centralized run (experiment=ham10000 as it is): ham10000_natural_sites.json
REFERENCE = "centralized"
REFERENCE_BAL_ACC = 0.511  # its pooled test balanced accuracy, seeds 42-44


def federated(label: str) -> bool:
    """Whether a run label is a federation (not pooled training, not one source alone)."""
    return not label.startswith(("centralized", "local:"))


def compared_with(label: str, pooled: tuple[str, str] | None) -> str:
    """The name of the pooled row a federated row's gap is taken against."""
    if not federated(label) or pooled == NO_POOLED:
        return "-"
    return next((n for n, f, lab, _, _ in ROWS if pooled and (f, lab) == pooled), "centralized (reference)")


def load(folder: Path, name: str, label: str) -> list[dict]:
    """The runs of ``label`` in ``bench_out/<name>.json``; ``<label>:own``: each site's fine-tuned model on its own
    lesions (``personalized_sites``) in place of the one model's figures, judged by the same models' validation."""
    path = folder / f"{name}.json"
    if not path.exists():
        return []
    base, own = label.removesuffix(":own"), label.endswith(":own")
    rows = sorted((r for r in json.loads(path.read_text()) if r["label"] == base), key=lambda r: r["seed"])
    if own:
        rows = [{**r, "label": label, "test_sites": r["personalized_sites"],
                 "val_balanced_acc": r["personalized_sites"]["val_pooled"]["balanced_acc"],
                 "selected": f"{r['selected']}, then fine-tuned at each site"} for r in rows]
    return rows


def earlier(path: Path | None) -> dict[str, list[list[str]]]:
    """The rows a results file already holds, by their run name (first cell)."""
    out: dict[str, list[list[str]]] = {}
    if path is not None and path.exists():
        for row in json.loads(path.read_text())["rows"]:
            out.setdefault(row[0], []).append(row)
    return out


def kept_mean(kept: dict[str, list[list[str]]], columns: list[str], name: str, seeds: set[int]) -> float | None:
    """The test balanced accuracy a results file holds for row ``name``, if it was run at exactly ``seeds``."""
    for row in kept.get(name, []):
        cells = dict(zip(columns, row, strict=True))
        if {int(s) for s in cells["seeds"].split()} == seeds:
            return float(cells["test bal. ACC"].split()[0])  # "mean ± std"
    return None


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def wall_time(rs: list[dict]) -> str:
    """Mean seconds per run; a run resumed from its checkpoint (``resume=``) timed only its resumed part, so it is
    left out (and the seeds the mean covers named)."""
    whole = [r for r in rs if not any(o.startswith("resume=") for o in r.get("overrides", []))]
    text = f"{mean([r['seconds'] for r in whole]):.0f}"
    return text if len(whole) == len(rs) else f"{text} (seeds {' '.join(str(r['seed']) for r in whole)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-out", type=Path, default=Path("bench_out"))
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--results-per-site", type=Path, default=None,
                    help="also write every metric at every site (pooled test and each site's own test lesions)")
    args = ap.parse_args()
    ref = json.loads(Path("benchmarks/results/ham10000_natural_sites.json").read_text())
    columns = ["run", "options (with experiment=ham10000)", "seeds", "selected", "val bal. ACC", "test bal. ACC",
               "test macro-F1", "test AUROC", *[f"bal. ACC @ {s}" for s in SITES],
               "pooled run compared with", "gap to pooled (points)", "wall time (s)"]
    body = []
    head = ref["columns"]
    row = next(r for r in ref["rows"] if r[0] == REFERENCE)
    cells = dict(zip(head, row, strict=True))
    body.append(["centralized (reference, Results: HAM10000 on its four sites)", "-", cells["seeds"],
                 cells["selected"], "-", cells["test bal. ACC"], cells["test macro-F1"], cells["test AUROC"],
                 *[cells[f"bal. ACC @ {s}"] for s in SITES], "-", "-", cells["wall time (s)"]])
    per_site = []
    kept = earlier(args.results)
    kept_per_site = earlier(args.results_per_site)
    for name, file, label, pooled, options in ROWS:
        rs = load(args.bench_out, file, label)
        if not rs:  # not run here: the figures the results files hold, if any
            body += kept.get(name, [])
            per_site += kept_per_site.get(name, [])
            continue
        for where in ("pooled", *SITES):
            per_site.append([name, " ".join(str(r["seed"]) for r in rs), where, str(rs[0]["test_sites"][where]["n"]),
                             *[ms([r["test_sites"][where][k] for r in rs]) for k in ("balanced_acc", "f1", "auroc")]])
        pooled_bal, paired = None, rs
        if pooled not in (None, NO_POOLED):
            seeds_here = {r["seed"] for r in rs}  # the gap is taken at the seeds both rows have
            prs = [r for r in load(args.bench_out, *pooled) if r["seed"] in seeds_here]
            pooled_bal = mean([r["test_sites"]["pooled"]["balanced_acc"] for r in prs]) if prs else None
            paired = [r for r in rs if r["seed"] in {p["seed"] for p in prs}]
            if not prs:  # the pooled row's runs are not here: its mean in the results file, at the same seeds
                pooled_bal, paired = kept_mean(kept, columns, compared_with(label, pooled), seeds_here), rs
        elif pooled is None and federated(label):  # the reference centralized run: same network and inputs
            pooled_bal = REFERENCE_BAL_ACC
        bal = [r["test_sites"]["pooled"]["balanced_acc"] for r in rs]
        gap = "-"
        if pooled_bal is not None:
            gap = f"{100 * (mean([r['test_sites']['pooled']['balanced_acc'] for r in paired]) - pooled_bal):+.1f}"
            if len(paired) < len(rs):
                gap += f" (seeds {' '.join(str(r['seed']) for r in paired)})"
        vals = [r["val_balanced_acc"] for r in rs if "val_balanced_acc" in r]
        seeds, selected = " ".join(str(r["seed"]) for r in rs), "; ".join(r["selected"] for r in rs)
        body.append([name, f"`{options}`" if options != "-" else "-", seeds, selected,
                     ms(vals) if vals else "-", ms(bal),
                     ms([r["test_sites"]["pooled"]["f1"] for r in rs]),
                     ms([r["test_sites"]["pooled"]["auroc"] for r in rs]),
                     *[ms([r["test_sites"][s]["balanced_acc"] for r in rs]) for s in SITES],
                     compared_with(label, pooled), gap, wall_time(rs)])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in body:
        print("| " + " | ".join(row) + " |")
    for path, cols, rows in ((args.results, columns, body),
                             (args.results_per_site, ["run", "seeds", "test data", "n", "bal. ACC", "macro-F1",
                                                      "AUROC"], per_site)):
        if path:
            table = json.loads(path.read_text()) if path.exists() else {}
            table["columns"], table["rows"] = cols, rows
            path.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
