"""`make bench-train`: what a CSQ training step costs next to a float one (ResNet-20, CPU;
and on the GPU when CUDA is present).

Both are measured in one run on the same batch of 128 random 3x32x32 images: a plain float
ResNet-20 with SGD, and the CSQ model `mixq train` builds (A8 activations by default, SGD +
Adam as in train/loop.py, mid-search beta so every gate is soft and the budget term active).

Step time: one child process holds both models and alternates their steps (warm-up steps
first, then the median of --steps each), so a busy machine slows both alike.
Memory: each model in a fresh child process; the peak resident set minus the resident set
just before the model is built, i.e. what training itself allocates (parameters, gradients,
optimizer state, saved activations), not the shared torch runtime.

GPU (when torch sees CUDA): the same two steps on the device, timed with a synchronize after
each, plus the CSQ step with bf16 autocast (--amp bf16 of mixq train), and the peak device
memory of each (torch.cuda.max_memory_allocated).

    python bench/bench_train.py [--batch 128] [--steps 10] [--warmup 3] [--threads N] [--a32] [--no-gpu]
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


def trainer(kind: str, x, amp: bool = False):
    """A closure doing one training step of `kind` (float | csq | csq-a32) on batch x, on x's
    device: the step `mixq train` runs (schedule, regularizer, forward, backward, optimizers)."""
    import torch
    import torch.nn.functional as F
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)
    schedule = lambda: None
    if kind == "float":
        from mixq.models import build_model
        model = build_model("resnet20", 10).to(x.device)
        opts = [torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)]
        regularizer = lambda: 0.0
    else:
        from mixq.train.config import TrainConfig, build
        from mixq.train.loop import make_optimizers
        cfg = TrainConfig(model="resnet20", dataset="cifar10", act_bits=8 if kind == "csq" else 32,
                          input_shape=(3, 32, 32))
        model, method = build(cfg)
        model.input_quant.calibrate(x.cpu())
        model.to(x.device)
        schedule = lambda: method.on_step(cfg.epochs / 2)       # mid-search: beta ~ 14, regularizer active
        schedule()
        opts = list(make_optimizers(model, cfg).values())
        regularizer = method.regularizer
    model.train()

    def step():
        schedule()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y) + regularizer()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return step


def measure_time(kinds, batch, steps, warmup, device: str = "cpu") -> dict:
    import torch
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    steppers = {k: trainer(k.removesuffix("+bf16"), x, amp=k.endswith("+bf16")) for k in kinds}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in kinds}
    for i in range(warmup + steps):
        for k in kinds:
            sync()
            t0 = time.perf_counter()
            steppers[k]()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    res = {"step_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
           "min_ms": {k: 1000 * min(v) for k, v in times.items()}, "threads": torch.get_num_threads()}
    if device == "cuda":
        res["device"] = torch.cuda.get_device_name(0)
    return res


def measure_gpu_memory(kind, batch) -> dict:
    import torch
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to("cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = trainer(kind.removesuffix("+bf16"), x, amp=kind.endswith("+bf16"))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return {"train_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}


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
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU measurement even when CUDA is present")
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
        if args.child == "gpu-time":
            res = measure_time(GPU_KINDS, args.batch, args.steps, args.warmup, "cuda")
        elif args.child.startswith("gpu-"):
            res = measure_gpu_memory(args.child.removeprefix("gpu-"), args.batch)
        elif args.child == "time":
            res = measure_time(kinds, args.batch, args.steps, args.warmup)
        else:
            res = measure_memory(args.child, args.batch)
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
    if args.no_gpu or not cuda_available():
        print("GPU: not measured (no CUDA device)" if not args.no_gpu else "GPU: skipped (--no-gpu)")
        return
    timing = run_child(args, "gpu-time")
    memory = {k: run_child(args, f"gpu-{k}")["train_mb"] for k in GPU_KINDS}
    ms = timing["step_ms"]
    print(f"ResNet-20 training step on {timing['device']}, batch {args.batch}: median of {args.steps} steps")
    for k in GPU_KINDS:
        print(f"  {k:9s} {ms[k]:8.2f} ms/step   {memory[k]:7.1f} MB peak device memory"
              f"   ({ms[k] / ms['float']:.2f}x float)")


GPU_KINDS = ["float", "csq", "csq+bf16"]


def cuda_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    return r.stdout.strip() == "True"


if __name__ == "__main__":
    main()
