"""Input pipeline vs model step on CPU: is data loading the bottleneck?

For each dataset config it measures, on the training split:
- the first pass: decode + deterministic preprocessing into the cache (MONAI CacheDataset);
- later epochs: images/s of the DataLoader alone (cached tensors + random augmentation), and
  images/s of the model's training step alone (forward, backward, Adam) on the same batches.
Target (issue 3): data time < 20% of step time after the first epoch. Ratios are taken within one
run, as the machine is noisy.

    python benchmarks/pipeline_bench.py [--batches 40] [--data pneumoniamnist brain_mri]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedmed.build import build_module
from fedmed.config import compose
from fedmed.data import Pipeline, make_loader


def bench(data: str, batches: int, extra: list[str]) -> dict:
    cfg = compose("fit", [f"data={data}", *extra])
    pipe = Pipeline.from_config(cfg.data)
    n = len(pipe.source.labels("train"))
    t0 = time.perf_counter()
    train = pipe.dataset("train", train=True)
    cache_s = time.perf_counter() - t0
    bs = cfg.data.batch_size
    loader = make_loader(train, bs, shuffle=True, seed=0)
    it = iter(loader)
    next(it)  # warm-up
    got = []
    t0 = time.perf_counter()
    for _ in range(batches):
        got.append(next(it))
    data_s = (time.perf_counter() - t0) / batches

    module = build_module(cfg)
    net, opt = module.net.train(), torch.optim.Adam(module.net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    step(*got[0])  # warm-up
    t0 = time.perf_counter()
    for x, y in got:
        step(x, y)
    step_s = (time.perf_counter() - t0) / batches
    return {"data": data, "size": tuple(train.x.shape[1:]), "n": n, "cache_s": cache_s, "bs": bs,
            "augment": type(train).__name__ == "AugmentedDataset",
            "data_ips": bs / data_s, "step_ips": bs / step_s, "ratio": data_s / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--data", nargs="+", default=["pneumoniamnist", "brain_mri"])
    ap.add_argument("overrides", nargs="*", help="config overrides for every dataset, e.g. model=densenet")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| data | input | train images | first pass (cache) | augmentation | loader img/s | step img/s "
          "| data / step time |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.data:
        r = bench(d, args.batches, args.overrides)
        print(f"| {r['data']} | {'x'.join(map(str, r['size']))} | {r['n']} | {r['cache_s']:.1f} s "
              f"({r['n'] / r['cache_s']:.0f} img/s) | {'on' if r['augment'] else 'off'} | {r['data_ips']:.0f} "
              f"| {r['step_ips']:.0f} | {100 * r['ratio']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
