"""Benchmark: HAM10000 on its four real acquisition sites (natural partition by `source`).

Centralized, federated strategies and each site alone, with the same model, resolution, total
epochs (rounds x local epochs) and selection rule (`federation.select`, on validation data, never the test split).
The selected model of every run is evaluated on the pooled test split and on each site's own test
lesions (the test rows whose `source` is that site): balanced accuracy, macro-F1, macro AUROC.

Every model is evaluated with the weights `fedmed fit` selects and logs (`checkpoint/model.pt` in
its MLflow run). For FedBN that is the global model, whose BatchNorm layers hold the pooled
statistics (`bn_stats: pooled`); the sites' own BatchNorm layers are not part of it.

Usage:
    FEDMED_DATA_DIR=../shared/data python benchmarks/ham10000_sites.py \
        [--seeds 42] [--runs centralized fedavg fedbn locals] [--name ham10000_sites] [override ...]

Run labels: centralized, fedavg, fedavgm, fedbn, fedprox, fedadam, scaffold, fednova, finetune (FedAvg plus
`federation.finetune_epochs`; each site's fine-tuned model is also scored on that site's own test lesions, and all
of them together), centralized_finetune (its control: the pooled model fine-tuned at each site the same way),
locals (every site alone) or local:<site>. Any partition works (`partition=iid` for the reference without
site shift); the per-site columns always score each acquisition source's own test lesions.
Prints a markdown table (mean +- std over seeds) and writes bench_out/<name>.json after every run;
rows already in that file (same label and seed) are kept and not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results import ms, save_json

from fedmed.build import build_module
from fedmed.config import compose
from fedmed.data.datamodule import ArrayDataset, Pipeline, make_loader
from fedmed.logs import setup_logging
from fedmed.models.metrics import compute_metrics, evaluate, make_metrics
from fedmed.tasks import fit

STRATEGIES = ("fedavg", "fedavgm", "fedbn", "fedprox", "fedadam", "scaffold", "fednova")
KEYS = ("balanced_acc", "f1", "auroc", "acc")


def run_overrides(label: str, finetune_epochs: int) -> list[str]:
    if label == "centralized":
        return ["mode=centralized"]
    if label in STRATEGIES:
        return [f"strategy={label}"]
    if label == "finetune":
        return ["strategy=fedavg", f"federation.finetune_epochs={finetune_epochs}"]
    if label == "centralized_finetune":  # pooled training, then each site fine-tunes it as in `finetune`
        return ["mode=centralized"]
    if label.startswith("local:"):
        return [f"site={label.removeprefix('local:')}"]
    raise SystemExit(f"unknown run {label!r}")


class TestSets:
    """The pooled test split and each site's own test rows, decoded once per data config."""

    def __init__(self, cfg):
        self.pipeline = Pipeline.from_config(cfg.data)
        src = self.pipeline.source
        self.pooled = self.pipeline.dataset("test")
        # each source's own test lesions, whatever the partition (iid too), a source that never trained included
        # (federation.sites naming fewer than data.sites: external validation)
        column = cfg.partition.get("column", "source")
        where = np.asarray(src.column("test", column))
        self.sites = {s: np.flatnonzero(where == s) for s in dict.fromkeys([*cfg.federation.sites, *cfg.data.sites])}
        self.num_classes = int(cfg.data.num_classes)
        self._val: tuple[ArrayDataset, np.ndarray] | None = None
        self._column = column

    def own(self, site: str, split: str = "test") -> ArrayDataset:
        """The rows of ``split`` (``test`` or ``val``) acquired at ``site``."""
        if split == "test":
            data, rows = self.pooled, self.sites[site]
        else:
            if self._val is None:
                self._val = (self.pipeline.dataset("val"), np.asarray(self.pipeline.source.column("val", self._column)))
            data, where = self._val
            rows = np.flatnonzero(where == site)
        return type(data)(data.x[rows], data.y[rows])

    def pooled_over(self, nets: dict[str, torch.nn.Module], split: str) -> dict[str, float]:
        """Each site's own ``net`` on that site's own rows of ``split``, all predictions scored together."""
        metrics = make_metrics(self.num_classes)
        n = 0
        with torch.no_grad():
            for site, net in nets.items():
                net.eval()
                for x, y in make_loader(self.own(site, split), 256, False):
                    metrics.update(net(x).softmax(-1), y)
                    n += len(y)
        scalars, _ = compute_metrics(metrics)
        return {**{k: scalars[k] for k in KEYS}, "n": n}

    def evaluate(self, net: torch.nn.Module, num_classes: int) -> dict[str, dict[str, float]]:
        out = {"pooled": self._metrics(net, self.pooled, num_classes)}
        for site in self.sites:
            out[site] = self.evaluate_site(net, site, num_classes)
        return out

    def evaluate_site(self, net: torch.nn.Module, site: str, num_classes: int) -> dict[str, float]:
        """``net`` on the test lesions of ``site`` only."""
        return self._metrics(net, self.own(site), num_classes)

    @staticmethod
    def _metrics(net, ds, num_classes: int) -> dict[str, float]:
        m, _ = evaluate(net, make_loader(ds, 256, False), num_classes)
        return {**{k: m[k] for k in KEYS}, "n": len(ds)}


def personalized(cfg, run_id: str, tests: TestSets) -> dict[str, dict[str, float]]:
    """Each site's fine-tuned model (`checkpoint/model.pt` in its site run) on that site's own test lesions;
    ``pooled``: every site's model on its own test lesions, scored together (what the sites get, as one figure);
    ``val_pooled``: the same on the sites' own validation rows (what fine-tuning is judged by)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.logger.tracking_uri)
    exp = client.get_run(run_id).info.experiment_id
    out, nets = {}, {}
    for r in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"):
        module = build_module(cfg)
        module.net.load_state_dict(selected_weights(cfg, r.info.run_id))
        nets[r.info.run_name] = module.net
        out[r.info.run_name] = tests.evaluate_site(module.net, r.info.run_name, cfg.data.num_classes)
    out["pooled"] = tests.pooled_over(nets, "test")
    out["val_pooled"] = tests.pooled_over(nets, "val")
    return out


def pooled_finetuned(cfg, weights: dict[str, torch.Tensor], tests: TestSets) -> dict[str, dict[str, float]]:
    """The control for a federation's fine-tuning: the pooled model fine-tuned at each site exactly as the
    federation's sites fine-tune theirs (``cfg``: the federated config with ``federation.finetune_epochs``; same
    site data, seeds, epochs and strategy instructions; a fresh optimizer, where the federation's sites may
    keep their Adam moments from the rounds), scored as :func:`personalized` scores those."""
    from fedmed import build

    fed, sites = cfg.federation, list(cfg.federation.sites)
    strategy = build.build_strategy(cfg, len(sites))
    _, datas = build.load_sites(cfg, tests.pipeline.source, sites)
    instructions = {**strategy.configure_fit(weights), "trained_epochs": fed.rounds * fed.local_epochs}
    out, nets = {}, {}
    for k, site in enumerate(sites):
        client = build.site_client(cfg, site, k, datas[site], strategy=strategy)
        client.finetune(weights, fed.rounds + 1, fed.finetune_epochs, instructions)
        nets[site] = client.module.net  # finetune's evaluation loaded the fine-tuned weights into it
        out[site] = tests.evaluate_site(nets[site], site, cfg.data.num_classes)
    out["pooled"] = tests.pooled_over(nets, "test")
    out["val_pooled"] = tests.pooled_over(nets, "val")
    return out


def selected_weights(cfg, run_id: str) -> dict[str, torch.Tensor]:
    """The weights `fedmed fit` selected (or a site fine-tuned), from its MLflow run (`checkpoint/model.pt`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.logger.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "checkpoint/model.pt", tmp)
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def metric_history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(cfg.logger.tracking_uri).get_metric_history(run_id, key)]


def validation_score(cfg, row: dict) -> float:
    """The validation balanced accuracy of the model a run selected (federated: the sites' validation images
    taken together, after head calibration where it ran): what a lever is chosen by, never the test split.

    A round's metrics are those of the model the sites evaluated (the mean of the rounds' models, or the model
    with its head calibrated, where `federation.average_from` / `federation.calibrate_from` made it so); a
    baseline's averaged or calibrated candidates are its `candidate_val_*` metrics."""
    selected, run_id = row["selected"], row["run_id"]
    step = int(selected.split()[1].split("/")[0].rstrip(","))
    if row["label"].startswith(("centralized", "local:")):
        candidates = dict(metric_history(cfg, run_id, "candidate_val_balanced_acc"))
        if step in candidates:
            return candidates[step]
        if "head calibrated" in selected:
            return metric_history(cfg, run_id, "calibrated_val_balanced_acc")[-1][1]
        return dict(metric_history(cfg, run_id, "val_balanced_acc"))[step]
    if "head calibrated" in selected and not dict(metric_history(cfg, run_id, "head_calibrated")).get(step):
        return metric_history(cfg, run_id, "calibrated_val_pooled_balanced_acc")[-1][1]
    return dict(metric_history(cfg, run_id, "val_pooled_balanced_acc"))[step]


def table(rows: dict[str, list[dict]], sites: list[str]) -> str:
    head = ["run", "test bal. ACC", "test macro-F1", "test AUROC", *[f"bal. ACC @ {s}" for s in sites], "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in rows.items():
        cells = [label] + [ms([r["test_sites"]["pooled"][k] for r in rs]) for k in ("balanced_acc", "f1", "auroc")]
        cells += [ms([r["test_sites"][s]["balanced_acc"] for r in rs]) for s in sites]
        cells.append(f"{statistics.mean(r['seconds'] for r in rs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NAMES = {"centralized": "centralized", "fedavg": "federated, FedAvg", "fedavgm": "federated, FedAvgM",
         "fedbn": "federated, FedBN", "fedprox": "federated, FedProx", "fedadam": "federated, FedAdam",
         "scaffold": "federated, SCAFFOLD", "fednova": "federated, FedNova",
         "finetune": "federated, FedAvg + fine-tuning", "centralized_finetune": "centralized + fine-tuning"}


def results_rows(rows: dict[str, list[dict]], sites: list[str]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the Results page table (``benchmarks/results/*.json``) for these runs."""
    columns = ["run", "seeds", "selected", "test bal. ACC", "test macro-F1", "test AUROC",
               *[f"bal. ACC @ {s}" for s in sites], "wall time (s)"]
    out = []
    for label, rs in rows.items():
        name = f"{label.removeprefix('local:')} alone" if label.startswith("local:") else NAMES.get(label, label)
        cells = [name, " ".join(str(r["seed"]) for r in rs), "; ".join(r["selected"] for r in rs)]
        cells += [ms([r["test_sites"]["pooled"][k] for r in rs]) for k in ("balanced_acc", "f1", "auroc")]
        cells += [ms([r["test_sites"][s]["balanced_acc"] for r in rs]) for s in sites]
        cells.append(f"{statistics.mean(r['seconds'] for r in rs):.0f}")
        out.append(cells)
        if all("personalized_sites" in r for r in rs):  # finetune: each site's own model on its own lesions
            cells = [f"{name}: each site's fine-tuned model", cells[1], "-", "-", "-", "-",
                     *[ms([r["personalized_sites"][s]["balanced_acc"] for r in rs]) for s in sites], "-"]
            out.append(cells)
    return columns, out


def per_site_rows(rows: dict[str, list[dict]], sites: list[str]) -> tuple[list[str], list[list[str]]]:
    """Every run on the pooled test split and on each site's own test lesions, all four metrics."""
    columns = ["run", "seeds", "test data", "n", "bal. ACC", "macro-F1", "AUROC", "ACC"]
    out = []
    for label, rs in rows.items():
        name = f"{label.removeprefix('local:')} alone" if label.startswith("local:") else NAMES.get(label, label)
        for where in ("pooled", *sites):
            out.append([name, " ".join(str(r["seed"]) for r in rs), where, str(rs[0]["test_sites"][where]["n"]),
                        *[ms([r["test_sites"][where][k] for r in rs]) for k in ("balanced_acc", "f1", "auroc", "acc")]])
    return columns, out


def write_results(path: Path, columns: list[str], body: list[list[str]]) -> None:
    """Put a table's columns and rows into a Results page JSON file (its other keys are kept)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table["columns"], table["rows"] = columns, body
    path.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--runs", nargs="+", default=["centralized", "fedavg", "fedbn", "locals"])
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--name", default="ham10000_sites", help="JSON name in bench_out/")
    ap.add_argument("--results", type=Path, default=None,
                    help="also write the table's columns and rows into this benchmarks/results/*.json file")
    ap.add_argument("--results-per-site", type=Path, default=None,
                    help="also write the per-site table (every metric at every site) into this file")
    ap.add_argument("--only", action="store_true", help="run nothing; print (and --results) what bench_out holds")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, e.g. federation.rounds=6 "
                    "(strategy.* ones to the federated runs only)")
    args = ap.parse_args()
    setup_logging()
    # strategy.* overrides (e.g. strategy.server_momentum=0.5) apply to the federated runs only
    strategy_keys = [o for o in args.overrides if o.startswith("strategy.")]
    base = ["data=ham10000", "logger.experiment=benchmark-ham10000", "logger.log_model=false",
            *[o for o in args.overrides if o not in strategy_keys]]
    out_path = Path("bench_out") / f"{args.name}.json"
    done: list[dict] = json.loads(out_path.read_text()) if out_path.exists() else []
    cfg = compose("fit", [*base, f"seed={args.seeds[0]}"])
    sites = list(cfg.federation.sites)
    labels = [x for r in args.runs for x in ([f"local:{s}" for s in sites] if r == "locals" else [r])]
    tests = None if args.only else TestSets(cfg)
    for seed in [] if args.only else args.seeds:
        for label in labels:
            if any(d["label"] == label and d["seed"] == seed for d in done):
                continue
            overrides = [*base, f"seed={seed}", *run_overrides(label, args.finetune_epochs)]
            if label in STRATEGIES or label == "finetune":
                overrides += strategy_keys
            cfg = compose("fit", overrides)
            t0 = time.perf_counter()
            res = fit.run(cfg)
            wall = time.perf_counter() - t0
            module = build_module(cfg)
            module.net.load_state_dict(selected_weights(cfg, res["run_id"]))
            per_site = tests.evaluate(module.net, cfg.data.num_classes)  # type: ignore[union-attr]
            xai = metric_history(cfg, res["run_id"], "xai_site_consistency") if res["mode"] == "federated" else []
            row = {"label": label, "seed": seed, "run_id": res["run_id"], "selected": res["selected"],
                   "seconds": wall, "train_seconds": res["seconds"], "overrides": overrides,
                   "test": res["test"], "test_sites": per_site, "val": res["sites"],
                   "xai_site_consistency": xai}
            row["val_balanced_acc"] = validation_score(cfg, row)
            if label == "finetune":
                row["personalized_sites"] = personalized(cfg, res["run_id"], tests)  # type: ignore[arg-type]
                # the global model on the same validation rows, for the paired comparison with fine-tuning
            if label == "centralized_finetune":
                tuned = compose("fit", [*base, f"seed={seed}", *run_overrides("finetune", args.finetune_epochs),
                                        *strategy_keys])
                row["personalized_sites"] = pooled_finetuned(tuned, module.net.state_dict(), tests)  # type: ignore[arg-type]
            if "personalized_sites" in row:
                row["global_val_pooled"] = tests.pooled_over(  # type: ignore[union-attr]
                    dict.fromkeys(cfg.federation.sites, module.net), "val")
            done.append(row)
            save_json(args.name, done)
            print(f"{label} seed {seed}: selected {res['selected']}, pooled test bal. ACC "
                  f"{per_site['pooled']['balanced_acc']:.3f} (fit says {res['test']['balanced_acc']:.3f}), "
                  f"{wall:.0f}s", flush=True)
    missing = [d for d in done if "val_balanced_acc" not in d]
    for d in missing:  # rows written before the validation score was recorded
        d["val_balanced_acc"] = validation_score(compose("fit", d["overrides"]), d)
    if missing:
        save_json(args.name, done)
    rows: dict[str, list[dict]] = {}
    for d in done:
        rows.setdefault(d["label"], []).append(d)
    if not args.only:
        print(f"\nham10000, {cfg.model.name}, {cfg.data.image_size} px, {cfg.federation.rounds} rounds x "
              f"{cfg.federation.local_epochs} local epochs; seeds {sorted({d['seed'] for d in done})}\n")
    print(table(rows, sites))
    if args.results:
        write_results(args.results, *results_rows(rows, sites))
    if args.results_per_site:
        write_results(args.results_per_site, *per_site_rows(rows, sites))


if __name__ == "__main__":
    main()
