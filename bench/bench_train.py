"""`make bench-train`: what a CSQ training step costs next to a float one (ResNet-20, CPU).

Both are measured in one run on the same batch of 128 random 3x32x32 images: a plain float
ResNet-20 with SGD, and the CSQ model `mixq train` builds (A8 activations by default, SGD +
Adam as in train/loop.py, mid-search beta so every gate is soft and the budget term active).

Step time: one child process holds both models and alternates their steps (warm-up steps
first, then the median of --steps each), so a busy machine slows both alike.
Memory: each model in a fresh child process; the peak resident set minus the resident set
just before the model is built, i.e. what training itself allocates (parameters, gradients,
optimizer state, saved activations), not the shared torch runtime.

    python bench/bench_train.py [--batch 128] [--steps 10] [--warmup 3] [--threads N] [--a32]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def trainer(kind: str, x):
    """A closure doing one training step of `kind` (float | csq | csq-a32) on batch x."""
    import torch
    import torch.nn.functional as F
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    if kind == "float":
        from mixq.models import build_model
        model = build_model("resnet20", 10)
        opts = [torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)]
        regularizer = lambda: 0.0
    else:
        from mixq.train.config import TrainConfig, build
        from mixq.train.loop import make_optimizers
        cfg = TrainConfig(model="resnet20", dataset="cifar10", act_bits=8 if kind == "csq" else 32,
                          input_shape=(3, 32, 32))
        model, method = build(cfg)
        model.input_quant.calibrate(x)
        method.on_epoch(cfg.epochs / 2)             # mid-search: beta ~ 14, regularizer active
        opts = list(make_optimizers(model, cfg).values())
        regularizer = method.regularizer
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y) + regularizer()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return step


def measure_time(kinds, batch, steps, warmup) -> dict:
    import torch
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    steppers = {k: trainer(k, x) for k in kinds}
    times = {k: [] for k in kinds}
    for i in range(warmup + steps):
        for k in kinds:
            t0 = time.perf_counter()
            steppers[k]()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {"step_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
            "min_ms": {k: 1000 * min(v) for k, v in times.items()}, "threads": torch.get_num_threads()}


def measure_memory(kind, batch) -> dict:
    import torch
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = rss_mb()
    step = trainer(kind, x)
    for _ in range(3):
        step()
    return {"train_mb": peak_rss_mb() - base}


def run_child(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--a32"] if args.a32 else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench-train: the {what} measurement failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--a32", action="store_true", help="also measure CSQ with float activations")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    kinds = ["float", "csq"] + (["csq-a32"] if args.a32 else [])
    if args.child:
        import torch
        # as mixq train does (train/loop.py), for both models; before any parallel op, so that
        # the OpenMP worker threads inherit the flush-to-zero mode with the main thread's
        torch.set_flush_denormal(True)
        if args.threads:
            torch.set_num_threads(args.threads)
        res = (measure_time(kinds, args.batch, args.steps, args.warmup) if args.child == "time"
               else measure_memory(args.child, args.batch))
        print(json.dumps(res))
        return
    timing = run_child(args, "time")
    memory = {k: run_child(args, k)["train_mb"] for k in kinds}
    ms, fastest = timing["step_ms"], timing["min_ms"]
    print(f"ResNet-20 training step on CPU, batch {args.batch}, {timing['threads']} threads: median of "
          f"{args.steps} steps after {args.warmup} warm-up, float and CSQ steps alternating "
          f"(load average {os.getloadavg()[0]:.1f})")
    for k in kinds:
        print(f"  {k:8s} {ms[k]:8.1f} ms/step (fastest {fastest[k]:.1f})   {memory[k]:7.1f} MB peak training memory")
    for k in kinds[1:]:
        print(f"{k} / float: step time {ms[k] / ms['float']:.2f}x   peak memory {memory[k] / memory['float']:.2f}x"
              f"   (target <= 2x; fastest steps: {fastest[k] / fastest['float']:.2f}x)")


if __name__ == "__main__":
    main()
