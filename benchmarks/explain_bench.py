"""Benchmark: heatmaps per second per method, and a faithfulness table per method, on CPU.

1. Speed: maps/s for every method, CompactCNN at 28 px and SmallInputDenseNet at 64 px, batch 64.
2. Faithfulness on real PneumoniaMNIST test images (CNN trained centrally, 5 epochs, on the train split):
   deletion / insertion AUC (target: predicted class) and the randomisation sanity check
   (Spearman correlation of maps of the trained and a re-initialised model; low is good).
3. Explainability score E (relevance mass accuracy) where the relevant region is known: real
   PneumoniaMNIST images with a planted 5x5 marker whose side (left/right) is the label, so the
   marker is the only evidence; E is reported next to the area fraction |R|/N a random map gets.

Usage:
    FEDMED_DATA_DIR=../shared/data python benchmarks/explain_bench.py [--n 128] [--methods gradcam ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch

from fedmed.data import MedMNISTSource, Pipeline, Preprocessing
from fedmed.data.datamodule import ArrayDataset, make_loader
from fedmed.explain import (
    METHODS,
    area_fraction,
    deletion_insertion,
    explain,
    randomized_copy,
    rank_correlation,
    relevance_mass,
)
from fedmed.logs import setup_logging
from fedmed.models import CompactCNN, SmallInputDenseNet
from fedmed.models.classifier import Classifier


def train(x, y, epochs=5, seed=0):
    L.seed_everything(seed, verbose=False)
    module = Classifier(CompactCNN(in_channels=1, num_classes=2), 2)
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module,
                                                                  make_loader(ArrayDataset(x, y), 64, True, seed))
    return module.net.eval()


def speed(method, net, x, reps=3):
    explain(net, x[:8], method)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        explain(net, x, method, batch_size=64)
    return reps * len(x) / (time.perf_counter() - t0)


def plant(x, seed=0, size=5):
    """Copy of x with a bright square on the left (label 0) or right (label 1) half; returns x, y, regions."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    n, _, h, w = x.shape
    y = torch.randint(0, 2, (n,), generator=g)
    regions = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        r = int(torch.randint(2, h - size - 2, (1,), generator=g))
        c = int(torch.randint(2, w // 2 - size, (1,), generator=g)) + (w // 2 if y[i] else 0)
        x[i, :, r : r + size, c : c + size] = 1.0
        regions[i, r : r + size, c : c + size] = True
    return x, y, regions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="test images for the faithfulness numbers")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--only", choices=["speed", "faithfulness"], help="run one part")
    args = ap.parse_args()
    setup_logging()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}\n")

    if args.only != "faithfulness":
        speed_table(args.methods)
    if args.only != "speed":
        faithfulness_tables(args)


def speed_table(methods) -> None:
    print("## Heatmaps per second (CPU, batch 64, 256 images, untrained weights: speed does not depend on them)\n")
    print("| method | CNN 28 px | DenseNet 64 px |")
    print("|---|---|---|")
    cnn = CompactCNN(in_channels=1, num_classes=2).eval()
    dense = SmallInputDenseNet(in_channels=1, num_classes=2, image_size=64).eval()
    x28, x64 = torch.rand(256, 1, 28, 28), torch.rand(128, 1, 64, 64)
    for m in methods:
        print(f"| {m} | {speed(m, cnn, x28):.0f} | {speed(m, dense, x64, reps=1):.0f} |", flush=True)


def faithfulness_tables(args) -> None:

    src = MedMNISTSource("pneumoniamnist", str(Path(os.environ.get("FEDMED_DATA_DIR", "data")) / "medmnist"))
    pipe = Pipeline(src, Preprocessing())
    tr, te = pipe.dataset("train"), pipe.dataset("test")
    net = train(tr.x, tr.y)
    rnd = randomized_copy(net, 0)
    idx = torch.randperm(len(te), generator=torch.Generator().manual_seed(0))[: args.n]
    x, y = te.x[idx], te.y[idx]
    with torch.no_grad():
        pred = net(x).argmax(-1)
    acc = float((pred == y).float().mean())
    print(f"\n## Faithfulness on PneumoniaMNIST test (n={len(x)}; CNN test ACC on these {acc:.3f})\n")
    print("| method | deletion AUC (lower better) | insertion AUC (higher better) | sanity rank corr (lower better) |")
    print("|---|---|---|---|")
    for m in args.methods:
        maps = explain(net, x, m, pred)
        d, i = deletion_insertion(net, x, maps, pred)
        rho = rank_correlation(maps, explain(rnd, x, m, pred))
        print(f"| {m} | {d.mean():.3f} | {i.mean():.3f} | {rho.mean():.3f} |", flush=True)
    dr, ir = deletion_insertion(net, x, torch.rand(len(x), 28, 28), pred)
    print(f"| (random map) | {dr.mean():.3f} | {ir.mean():.3f} | - |")

    xp, yp, _ = plant(tr.x[:3000], seed=1)
    pnet = train(xp, yp, epochs=3, seed=1)
    prnd = randomized_copy(pnet, 0)
    xt, yt, rt = plant(te.x[: args.n], seed=2)
    with torch.no_grad():
        acc = float((pnet(xt).argmax(-1) == yt).float().mean())
    print(f"\n## Explainability score E with a known region (PneumoniaMNIST + planted marker, n={len(xt)}, "
          f"model ACC {acc:.3f}; area fraction |R|/N = {area_fraction(rt).mean():.3f})\n")
    print("| method | E trained | E randomised model |")
    print("|---|---|---|")
    for m in args.methods:
        e = relevance_mass(explain(pnet, xt, m, yt), rt).mean()
        er = relevance_mass(explain(prnd, xt, m, yt), rt).mean()
        print(f"| {m} | {e:.3f} | {er:.3f} |", flush=True)


if __name__ == "__main__":
    main()
