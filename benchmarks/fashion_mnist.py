"""Benchmark: Fashion-MNIST (`data=fashion_mnist`), centralized and federated, against published claims.

Centralized: the compact CNN (three conv blocks 32/64/64 at 28 px), Adam, `--epochs` epochs,
selection on the carved validation split (best validation loss), evaluation on the official
10,000 test images: accuracy, macro-F1 and per-class F1, the Shirt/Coat confusions, and a
Grad-CAM grid of Shirt and Coat test images (`--figure`).
Federated: FedAvg over 4 sites with a Dirichlet(`--alpha`) label split, the same total epochs
(`--epochs` rounds x 1 local epoch).

Usage:
    FEDMED_DATA_DIR=../shared/data python benchmarks/fashion_mnist.py [--seeds 42] [--runs centralized fedavg] \
        [--epochs 15] [--figure docs/assets/fashion_mnist_gradcam_shirt_coat.png] [override ...]

Writes bench_out/<name>.json after every run (rows already there, same run and seed, are kept).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from results import save_json

from fedmed.build import build_module
from fedmed.config import compose
from fedmed.data.datamodule import Pipeline, make_loader
from fedmed.explain import explain, heatmap_grid, predict
from fedmed.logs import setup_logging
from fedmed.models.metrics import evaluate
from fedmed.tasks import fit

SITES = ["hospital_a", "hospital_b", "hospital_c", "hospital_d"]


def selected_weights(cfg, run_id: str) -> dict[str, torch.Tensor]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(cfg.logger.tracking_uri).download_artifacts(run_id, "checkpoint/model.pt", tmp)
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def gradcam_figure(net, test, names: list[str], path: Path, per_class: int, title: str) -> dict:
    """Grad-CAM (of the predicted class) of the first ``per_class`` Shirt and Coat test images."""
    shirt, coat = names.index("Shirt"), names.index("Coat")
    pick = torch.cat([torch.nonzero(test.y == c).flatten()[:per_class] for c in (shirt, coat)])
    x, y = test.x[pick], test.y[pick]
    pred, conf = predict(net, x)
    maps = explain(net, x, "gradcam")
    fig = heatmap_grid(x, maps, y, pred, conf, names, title, per_row=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    # where the heat lies, for the two classes: mean map over the images of each true class
    return {"images": pick.tolist(), "correct": int((pred == y).sum()), "n": len(y),
            "mean_map_shirt_vs_coat_corr": float(torch.corrcoef(torch.stack(
                [maps[y == shirt].mean(0).flatten(), maps[y == coat].mean(0).flatten()]))[0, 1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--runs", nargs="+", default=["centralized", "fedavg"], choices=["centralized", "fedavg"])
    ap.add_argument("--epochs", type=int, default=15, help="total epochs (federated: rounds x 1 local epoch)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--figure", default="docs/assets/fashion_mnist_gradcam_shirt_coat.png")
    ap.add_argument("--per-class", type=int, default=4, help="Shirt and Coat images in the figure")
    ap.add_argument("--name", default="fashion_mnist")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging()
    base = ["data=fashion_mnist", "logger.experiment=benchmark-fashion-mnist", "logger.log_model=false",
            f"federation.rounds={args.epochs}", "federation.local_epochs=1", *args.overrides]
    runs = {"centralized": ["mode=centralized"],
            "fedavg": ["strategy=fedavg", "partition=dirichlet", f"partition.alpha={args.alpha}",
                       f"federation.sites=[{','.join(SITES)}]"]}
    out_path = Path("bench_out") / f"{args.name}.json"
    done: list[dict] = json.loads(out_path.read_text()) if out_path.exists() else []
    test = None
    for seed in args.seeds:
        for label in args.runs:
            if any(d["label"] == label and d["seed"] == seed for d in done):
                continue
            overrides = [*base, f"seed={seed}", *runs[label]]
            cfg = compose("fit", overrides)
            t0 = time.perf_counter()
            res = fit.run(cfg)
            wall = time.perf_counter() - t0
            pipeline = Pipeline.from_config(cfg.data)
            names = pipeline.source.class_names
            test = test if test is not None else pipeline.dataset("test")
            module = build_module(cfg)
            module.net.load_state_dict(selected_weights(cfg, res["run_id"]))
            net = module.net.eval()
            metrics, confmat = evaluate(net, make_loader(test, 256, False), cfg.data.num_classes)
            shirt, coat = names.index("Shirt"), names.index("Coat")
            row = {"label": label, "seed": seed, "run_id": res["run_id"], "selected": res["selected"],
                   "seconds": wall, "train_seconds": res["seconds"], "overrides": overrides, "test": metrics,
                   "f1_by_class": {n: metrics[f"f1_class{i}"] for i, n in enumerate(names)},
                   "confusion": confmat.tolist(),
                   "shirt_as_coat": int(confmat[shirt, coat]), "coat_as_shirt": int(confmat[coat, shirt]),
                   "val": res["sites"]}
            if label == "centralized" and args.figure:
                title = (f"Fashion-MNIST test: Grad-CAM of the centralized compact CNN (seed {seed}, "
                         f"{res['selected']}), first {args.per_class} Shirt and {args.per_class} Coat images")
                row["gradcam"] = {"figure": args.figure,
                                  **gradcam_figure(net, test, names, Path(args.figure), args.per_class, title)}
            done.append(row)
            save_json(args.name, done)
            print(f"{label} seed {seed}: selected {res['selected']}, test ACC {metrics['acc']:.4f}, "
                  f"macro-F1 {metrics['f1']:.4f}, {wall:.0f}s; per-class F1 "
                  + ", ".join(f"{n} {v:.3f}" for n, v in row["f1_by_class"].items()), flush=True)


if __name__ == "__main__":
    main()
