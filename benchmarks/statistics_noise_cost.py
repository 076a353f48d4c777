"""Benchmark: what the Gaussian noise on the class statistics costs head calibration.

Head calibration (``federation.calibrate_head``) re-fits the classifier layer on virtual features drawn from
the per-class moments every site sends. Under DP-SGD those moments are clipped and noised
(``privacy.statistics_noise``, ``privacy.statistics_clip``; docs: Privacy). This script takes federations that
ran with head calibration, keeps each one's selected model *before* calibration (the ``best`` weights of its
server checkpoint), recomputes every site's statistics with the library's own functions and re-fits the head
from them: in the clear (what the federation did), clipped only, and clipped with each noise level, several
independent draws each. It reports the pooled validation and test balanced accuracy of each head beside the
epsilon one release spends at each site (one Gaussian mechanism on the whole data, PRV and RDP accountants).

What it isolates: the cost of the statistics' noise for a fixed feature extractor trained without DP. Under
DP-SGD the extractor itself is noisier; that cost is measured elsewhere (Results: DP cost).

Usage:
    FEDMED_DATA_DIR=../shared/data python benchmarks/statistics_noise_cost.py \
        --checkpoints <output_dir>/checkpoints/<run id>/server.pt [...] [--noise 0.5 1 2 4 8] [--draws 3] \
        [--name statistics_noise_cost] [--results benchmarks/results/<file>.json]

Prints a markdown table (mean +- std over checkpoints and draws) and writes bench_out/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results import ms, save_json
from sklearn.metrics import balanced_accuracy_score

from fedmed import build
from fedmed.data.datamodule import Pipeline
from fedmed.federated.statistics import (
    class_statistics,
    feature_batches,
    last_linear,
    noisy_statistics,
    summed,
    withhold_small_classes,
)
from fedmed.logs import setup_logging
from fedmed.privacy.dp import epsilon_of, release_noise


def penultimate(net: torch.nn.Module, dataset) -> tuple[torch.Tensor, np.ndarray]:
    """The input of the classifier layer for every image of ``dataset`` (eval mode), and the labels."""
    batches = list(feature_batches(net, dataset))
    return torch.cat([f for f, _ in batches]).float(), torch.cat([y for _, y in batches]).numpy().reshape(-1)


def head_score(weights: dict[str, torch.Tensor], name: str, feats: torch.Tensor, labels: np.ndarray) -> float:
    """Balanced accuracy (scikit-learn) of the classifier layer ``name`` in ``weights`` on fixed features."""
    logits = feats @ weights[f"{name}.weight"].float().T + weights[f"{name}.bias"].float()
    return float(balanced_accuracy_score(labels, logits.argmax(1).numpy()))


def one_checkpoint(path: Path, noises: list[float], draws: int, clip: float) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = build.checked_config(ckpt["config"], str(path))
    if not cfg.federation.get("calibrate_head"):
        raise SystemExit(f"{path}: this federation ran without federation.calibrate_head")
    _, best_round, weights = ckpt["best"][:3]
    net = build.build_module(cfg).net
    net.load_state_dict(weights)
    name, layer = last_linear(net)
    pipeline = Pipeline.from_config(cfg.data)
    _, datas = build.load_sites(cfg, pipeline.source, list(cfg.federation.sites))
    most_few = int(cfg.federation.get("calibrate_min_images", 10))
    C = cfg.data.num_classes
    clear, clipped, val = [], [], [penultimate(net, d.val) for d in datas.values()]
    for data in datas.values():  # what each site computes: the same (augmented) training set as in the federation
        clear.append(withhold_small_classes(class_statistics(net, data.train, C, True), most_few))  # as sites do
        clipped.append(class_statistics(net, data.train, C, True, clip=clip))
    val_x, val_y = torch.cat([f for f, _ in val]), np.concatenate([y for _, y in val])
    test_x, test_y = penultimate(net, pipeline.dataset("test"))
    calibration = build.head_calibration(cfg)
    assert calibration is not None
    rows = [{"statistics": "none (the federation's head)", "noise": None, "draw": 0,
             "val": head_score(weights, name, val_x, val_y), "test": head_score(weights, name, test_x, test_y)}]

    def add(label: str, noise: float | None, draw: int, total) -> None:
        fitted = calibration.fit(net, weights, total)
        rows.append({"statistics": label, "noise": noise, "draw": draw,
                     "val": head_score(fitted, name, val_x, val_y), "test": head_score(fitted, name, test_x, test_y)})

    add("clear", None, 0, summed(clear))
    add(f"clipped to {clip:g}", 0.0, 0, summed(clipped))
    dim = layer.in_features
    for noise in noises:
        for draw in range(draws):
            rng = np.random.default_rng([int(cfg.seed), draw, int(noise * 1000)])
            noisy = [noisy_statistics(s, C, dim, noise, clip, int(s["counts"].sum()), rng) for s in clipped]
            add(f"clipped to {clip:g}, noise {noise:g}", noise, draw, summed(noisy))
    sizes = {s: len(d.train) for s, d in datas.items()}
    feature_norm = val_x.norm(dim=1)
    return {"checkpoint": str(path), "run_id": ckpt.get("run_id"), "seed": int(cfg.seed), "best_round": best_round,
            "image_size": int(cfg.data.image_size), "train_images": sizes,
            "feature_norm_median": float(feature_norm.median()), "feature_norm_p95": float(feature_norm.quantile(0.95)),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="server.pt of head-calibrated runs")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0],
                    help="privacy.statistics_noise values")
    ap.add_argument("--draws", type=int, default=3, help="independent noise draws per level")
    ap.add_argument("--clip", type=float, default=10.0, help="privacy.statistics_clip (default 10, the config's)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--name", default="statistics_noise_cost", help="JSON name in bench_out/")
    ap.add_argument("--results", type=Path, default=None, help="also write the table into this results JSON file")
    args = ap.parse_args()
    setup_logging()
    t0 = time.perf_counter()
    runs = [one_checkpoint(p, args.noise, args.draws, args.clip) for p in args.checkpoints]
    labels = list(dict.fromkeys(r["statistics"] for r in runs[0]["rows"]))
    columns = ["head fitted on", "privacy.statistics_noise", "epsilon per release (PRV / RDP)",
               "val bal. ACC", "test bal. ACC", "draws"]
    body = []
    for label in labels:
        got = [r for run in runs for r in run["rows"] if r["statistics"] == label]
        noise = got[0]["noise"]
        eps = "-"
        if noise:
            entry = [(release_noise(noise, True), 1.0, 1)]
            eps = f"{epsilon_of(entry, args.delta, 'prv'):.2f} / {epsilon_of(entry, args.delta, 'rdp'):.2f}"
        body.append([label, "-" if noise is None else f"{noise:g}", eps, ms([r["val"] for r in got]),
                     ms([r["test"] for r in got]), str(len(got))])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in body:
        print("| " + " | ".join(row) + " |")
    norms = [f"{r['feature_norm_median']:.1f} (95th percentile {r['feature_norm_p95']:.1f})" for r in runs]
    print(f"\nseeds {[r['seed'] for r in runs]}, delta {args.delta:g}; validation feature norm median: "
          f"{'; '.join(norms)}; {time.perf_counter() - t0:.0f}s")
    save_json(args.name, {"delta": args.delta, "runs": runs})
    if args.results:
        table = json.loads(args.results.read_text()) if args.results.exists() else {}
        table["columns"], table["rows"] = columns, body
        args.results.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
