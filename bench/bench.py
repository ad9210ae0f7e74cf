"""`make bench`: mixq's compiled integer programs against ONNX Runtime and torch, one run.

    .venv/bin/python bench/bench.py [--tune-trials N] [--models NAME ...]

Models (prepared under bench/out/, all from this run):
  digits-cnn  csq-mixed  CSQ, 8 epochs on the bundled digits (target 3 bits), frozen
              w8a8       STE uniform 8-bit weights (--method ste-uniform --weight-bits 8), 3 epochs
  resnet20,   csq-mixed  a random CSQ checkpoint: random kept-bit masks per layer (1-4 kept bit
                         positions, so 2..9 storage bits), BN statistics and activation clips
                         calibrated on CIFAR-10 training images (random images without the
                         dataset); speed does not depend on the weights' values
  mobilenetv2 w8a8       STE uniform 8-bit, random weights, calibrated the same way
              (mobilenetv2: the CIFAR-10 variant of models/mobilenet_v2.py, ReLU6 clips and
              signed int8 linear bottlenecks)
Runtimes, batch 1 and 32, 1 and 2 threads:
  mixq-default  `mixq compile FROZEN --target host` (no tuning; one library, any batch)
  mixq-tuned    `mixq compile FROZEN --target host --batch B --tune N --tune-db
                bench/out/tune-db-MODEL-bB`: N MetaSchedule trials per model and batch on top of
                the hand schedules (csq-mixed and w8a8 share the database: kernels are keyed by
                shape, so the second variant mostly reuses the first one's records)
  ort-int8      ONNX Runtime, QDQ model from quantize_static (u8 activations, s8 per-channel
                weights, 64 calibration images) of the fp32 ONNX export of the float model
  ort-fp32      ONNX Runtime on that fp32 export
  torch-fp32    the float torch model, eager, inference mode
Timing: wall time of one call from Python (each runtime's own call overhead included),
interleaved rounds over the runtimes so background load hits them alike (before each block
of timed calls: a 20 ms pause for the previous runtime's spinning threads to go idle and 3
untimed calls); ms per image =
ms per call / batch; median and p90 over all calls. Each thread count runs in its own
process (TVM's thread pool size is fixed when it starts). Every mixq row is checked against
the golden NumPy interpreter on a batch of real test images in the same process.
Results: bench/results.json ({"machine": ..., "rows": [...]}) and bench/results.md (generated
from the JSON). `--models A B` runs a subset and writes bench/results-A-B.{json,md} instead, so
a partial run never replaces the tables of a whole one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULTS_JSON = ROOT / "bench" / "results.json"
RESULTS_MD = ROOT / "bench" / "results.md"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
BATCHES = (1, 32)
THREADS = (1, 2)
RUNTIMES = ("mixq-default", "mixq-tuned", "ort-int8", "ort-fp32", "torch-fp32")
MODELS = {"digits-cnn": ("digits", (1, 8, 8)), "resnet20": ("cifar10", (3, 32, 32)),
          "mobilenetv2": ("cifar10", (3, 32, 32))}
BITS = ("csq-mixed", "w8a8")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, **kw):
    log(" ".join(map(str, cmd)))
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, text=True, capture_output=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench: command failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout


# ============================================================================ models
def dataset_images(model: str, n: int, split: str = "train") -> np.ndarray:
    """n float images (the training pipeline's normalization) of the model's dataset."""
    from mixq import data
    dataset, shape = MODELS[model]
    if dataset == "cifar10" and not CIFAR.exists():
        log(f"{CIFAR} missing: random images instead")
        return np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    spec = data.load(dataset, str(CIFAR) if dataset == "cifar10" else None)
    ds = spec.train if split == "train" else spec.test
    idx = np.random.default_rng(1).choice(len(ds), size=min(n, len(ds)), replace=False)
    return np.stack([ds[int(i)][0].numpy() for i in idx]).astype(np.float32)


def train_checkpoint(model: str, bits: str, run_dir: Path) -> Path:
    """Short training on the bundled digits (seconds)."""
    from mixq.train.config import TrainConfig
    from mixq.train_command import train
    if bits == "csq-mixed":
        cfg = TrainConfig(model=model, dataset="digits", method="csq", target_bits=3, epochs=8)
    else:
        cfg = TrainConfig(model=model, dataset="digits", method="ste-uniform", weight_bits=8, epochs=3)
    train(cfg, str(run_dir))
    return run_dir / "checkpoint.pt"


def calibrated_checkpoint(model: str, bits: str, run_dir: Path) -> Path:
    """A random-weight checkpoint, BN statistics and activation clips calibrated on images;
    CSQ with random kept-bit masks (1-4 of the 8 bit positions per layer)."""
    import torch

    from mixq.train import quant
    from mixq.train.config import TrainConfig, build
    dataset, shape = MODELS[model]
    torch.manual_seed(0)
    if bits == "csq-mixed":
        cfg = TrainConfig(model=model, dataset=dataset, method="csq", input_shape=shape, epochs=1)
    else:
        cfg = TrainConfig(model=model, dataset=dataset, method="ste-uniform", weight_bits=8, input_shape=shape, epochs=1)
    net, method = build(cfg)
    images = torch.from_numpy(dataset_images(model, 512))
    net.input_quant.calibrate(images)
    if bits == "csq-mixed":
        rng = np.random.default_rng(0)
        for _, layer in quant.quant_layers(net):
            kept = rng.choice(8, size=rng.integers(1, 5), replace=False)
            logits = torch.full((8,), -1.0)
            logits[torch.as_tensor(kept)] = 1.0
            layer.bit_mask_logits.data.copy_(logits)
    method.harden(True)
    net.train()
    with torch.no_grad():
        for i in range(0, len(images), 64):         # BN running statistics, PACT clip init
            net(images[i:i + 64])
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "config": cfg.to_dict(), "epoch": 0}, ckpt)
    return ckpt


def prepare_model(model: str, bits: str) -> dict:
    from mixq.freeze import freeze_checkpoint
    run_dir = OUT / f"{model}-{bits}"
    frozen = run_dir / "frozen"
    if not (frozen / "manifest.json").exists():
        log(f"preparing {model} {bits}")
        ckpt = train_checkpoint(model, bits, run_dir) if model == "digits-cnn" else \
            calibrated_checkpoint(model, bits, run_dir)
        freeze_checkpoint(str(ckpt), str(frozen))
    from mixq import graph as G
    g = G.load(frozen)
    layers = g.meta.get("layers", [])
    storage = sorted({r["storage_bits"] for r in layers})
    return {"model": model, "bits": bits, "frozen": str(frozen), "storage_bits": storage,
            "avg_storage_bits": sum(r["params"] * r["storage_bits"] for r in layers) / max(1, sum(r["params"] for r in layers))}


# ============================================================================ peers
def export_onnx(model: str) -> dict:
    """fp32 ONNX export of the float model, and its QDQ int8 quantization."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mixq.models import build_model
    fp32, pre, int8 = (OUT / f"{model}-{k}.onnx" for k in ("fp32", "pre", "int8"))
    if not int8.exists():
        torch.manual_seed(0)
        net = build_model(model, 10).eval()
        shape = MODELS[model][1]
        torch.onnx.export(net, torch.zeros(1, *shape), str(fp32), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
        quant_pre_process(str(fp32), str(pre))          # folds BN into conv, shape inference
        calib = dataset_images(model, 64)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

            def get_next(self):
                return next(self.it, None)
        quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"fp32": str(fp32), "int8": str(int8)}


# ============================================================================ mixq builds
def compile_mixq(case: dict, out: Path, batch: int | None = None, tune_trials: int = 0) -> dict:
    """One `mixq compile` (any batch, or --batch B with --tune N); times and library size."""
    cmd = [sys.executable, "-m", "mixq.cli", "compile", case["frozen"], "--target", "host", "--out", out]
    if batch is not None:
        cmd += ["--batch", batch]
    if tune_trials:
        cmd += ["--tune", tune_trials, "--tune-db", OUT / f"tune-db-{case['model']}-b{batch}"]
    t0 = time.time()
    run(cmd)
    wall = time.time() - t0
    deploy = json.loads((out / "deploy.json").read_text())
    info = deploy.get("lowering_info", {})
    tune_s = info.get("tune_seconds") or 0.0
    return {"library": str(out / deploy["library"]), "library_bytes": deploy["library_bytes"],
            "strategy": deploy.get("strategy"), "entry_batch": deploy["entry"]["batch"],
            "compile_seconds": round(deploy["compile_seconds"] - tune_s, 2),
            "tune_seconds": tune_s or None, "tune_trials": tune_trials,
            "tuned_kernels": info.get("tuned_kernels"), "wall_seconds": round(wall, 1)}


def compile_case(case: dict, tune_trials: int) -> dict:
    """mixq-default: a plain `mixq compile` (one library, any batch); mixq-tuned: per batch,
    `--batch B --tune N --tune-db` (csq-mixed and w8a8 of a model share the database)."""
    builds = OUT / "builds"
    name = f"{case['model']}-{case['bits']}"
    result = {"default": compile_mixq(case, builds / f"{name}-default")}
    for batch in BATCHES:
        result[f"tuned-{batch}"] = compile_mixq(case, builds / f"{name}-b{batch}-tuned", batch, tune_trials)
    return result


# ============================================================================ measuring (worker)
def timed_calls(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(plan: dict, threads: int) -> list[dict]:
    """Runs in a process whose TVM/OMP thread counts are `threads` (set by the parent)."""
    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    from mixq import graph as G
    from mixq.models import build_model
    torch.set_num_threads(threads)
    rows = []
    for case in plan["cases"]:
        g = G.load(case["frozen"])
        test_images = np.load(case["test_images"])
        for batch in BATCHES:
            x_float = test_images[:batch] if len(test_images) >= batch else \
                np.resize(test_images, (batch, *test_images.shape[1:]))
            x_q = G.quantize_input(g.input, x_float)
            golden = G.run(g, x_q)
            calls, bit_exact = {}, {}
            for kind in ("default", "tuned"):
                b = case["builds"]["default" if kind == "default" else f"tuned-{batch}"]
                vm = relax.VirtualMachine(tvm.runtime.load_module(b["library"]), tvm.cpu())
                xt = tvm.runtime.tensor(x_q)
                bit_exact[f"mixq-{kind}"] = bool(np.array_equal(vm["main"](xt).numpy(), golden))
                calls[f"mixq-{kind}"] = (lambda vm=vm, xt=xt: vm["main"](xt))
            for kind in ("int8", "fp32"):
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
                sess = ort.InferenceSession(case["onnx"][kind], so, providers=["CPUExecutionProvider"])
                feed = {"x": x_float}
                calls[f"ort-{kind}"] = (lambda s=sess, f=feed: s.run(None, f))
            torch.manual_seed(0)
            net = build_model(case["model"], 10).eval()
            xt_torch = torch.from_numpy(x_float)

            def torch_call(net=net, x=xt_torch):
                with torch.inference_mode():
                    net(x)
            calls["torch-fp32"] = torch_call
            times = {k: [] for k in calls}
            per_round = 25 if batch == 1 else 3
            rounds = plan["rounds"] if batch == 1 else max(4, plan["rounds"] // 2)
            for fn in calls.values():
                timed_calls(fn, per_round)                  # warm up
            for _ in range(rounds):
                for k, fn in calls.items():
                    # the runtime timed before may leave its worker threads spinning (ORT's
                    # intra-op pool, torch's OpenMP) on the same 2 cores: let them go idle, and
                    # warm this runtime's own pool, before its timed calls
                    time.sleep(0.02)
                    timed_calls(fn, 3)
                    times[k] += timed_calls(fn, per_round)
            for k, ts in times.items():
                ms = np.asarray(ts) * 1e3 / batch
                # peers are timed beside each mixq variant (same ONNX/torch models for both)
                row = {"model": case["model"], "bits": case["bits"], "batch": batch, "threads": threads, "runtime": k,
                       "ms_median": round(float(np.median(ms)), 5), "ms_p90": round(float(np.percentile(ms, 90)), 5),
                       "calls": len(ts), "bit_exact": bit_exact.get(k)}
                if k.startswith("mixq"):
                    b = case["builds"]["default" if k == "mixq-default" else f"tuned-{batch}"]
                    row.update({key: b[key] for key in ("compile_seconds", "tune_seconds", "tune_trials",
                                                        "library_bytes", "strategy", "tuned_kernels")})
                else:
                    row["artifact_bytes"] = os.path.getsize(case["onnx"][k.split("-")[1]]) if k.startswith("ort") else None
                rows.append(row)
            log(f"{case['model']} {case['bits']} batch {batch} threads {threads}: " +
                ", ".join(f"{k} {np.median(v) * 1e3 / batch:.3f}" for k, v in times.items()))
    return rows


# ============================================================================ report
def add_ratios(rows: list[dict]):
    """ratio_vs_<peer> = this row's median / the peer's median, same model, bits, batch, threads."""
    for peer in ("ort-int8", "ort-fp32", "torch-fp32"):
        ref = {(r["model"], r["bits"], r["batch"], r["threads"]): r["ms_median"] for r in rows if r["runtime"] == peer}
        for r in rows:
            base = ref.get((r["model"], r["bits"], r["batch"], r["threads"]))
            r[f"ratio_vs_{peer.replace('-', '_')}"] = round(r["ms_median"] / base, 3) if base else None


def machine_info() -> dict:
    import onnxruntime
    import torch
    import tvm
    from machine import cpu_name
    cpu = cpu_name()
    from tvm.target import codegen
    return {"cpu": cpu, "llvm_cpu": str(codegen.llvm_get_system_cpu()), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
                         "torch": torch.__version__, "numpy": np.__version__},
            "load_average_at_start": os.getloadavg()}


def write_markdown(results: dict, path: Path = RESULTS_MD):
    m = results["machine"]
    lines = [f"# mixq vs ONNX Runtime and torch (generated by `{results.get('command', 'make bench')}` from "
             f"{path.with_suffix('.json').name})", "",
             f"Machine: {m['cpu']} (LLVM: {m['llvm_cpu']}), {m['cores']} cores; TVM {m['versions']['tvm']}, "
             f"ONNX Runtime {m['versions']['onnxruntime']}, torch {m['versions']['torch']}. "
             f"Load average at start {', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}.", "",
             results.get("notes", ""), "",
             "ms per image: median (p90) over all timed calls; ratio = median / ORT int8 median in the "
             "same run, same model, batch and threads.", ""]
    for model in MODELS:
        for batch in BATCHES:
            rows = [r for r in results["rows"] if r["model"] == model and r["batch"] == batch]
            if not rows:
                continue
            lines += [f"## {model}, batch {batch}", "",
                      "| bits | threads | runtime | ms/image median | p90 | vs ORT int8 | vs ORT fp32 | vs torch | "
                      "bit-exact | compile s | tune s (trials) | artifact KiB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in sorted(rows, key=lambda r: (r["bits"], r["threads"], RUNTIMES.index(r["runtime"]))):
                exact = {True: "yes", False: "**NO**", None: "-"}[r["bit_exact"]]
                size = r.get("library_bytes") or r.get("artifact_bytes")
                tune = f"{r['tune_seconds']:.0f} ({r['tune_trials']})" if r.get("tune_seconds") else "-"
                lines.append(f"| {r['bits']} | {r['threads']} | {r['runtime']} | {r['ms_median']:.4f} | {r['ms_p90']:.4f} | "
                             f"{r['ratio_vs_ort_int8']:.2f}x | {r['ratio_vs_ort_fp32']:.2f}x | {r['ratio_vs_torch_fp32']:.2f}x | "
                             f"{exact} | {r.get('compile_seconds') or '-'} | {tune} | "
                             f"{f'{size / 1024:.0f}' if size else '-'} |")
            lines.append("")
    if results.get("bitserial"):
        lines += ["## Bit-serial kernels for 1-2 bit layers", "", results["bitserial"].get("summary", ""), "",
                  "| layer | activation bits | weight bits | threads | packed VNNI us | bit-serial us | "
                  "bit-serial / packed | both exact |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["bitserial"]["rows"]:
            exact = "yes" if r["bitserial_exact"] and r["packed_exact"] else "NO"
            lines.append(f"| {r['layer']} | {r['act_bits']} | {r['weight_bits']} | {r['threads']} | {r['packed_us']:.1f} | "
                         f"{r['bitserial_us']:.1f} | {r['bitserial_us'] / r['packed_us']:.1f}x | {exact} |")
        lines.append("")
    path.write_text("\n".join(lines))


# ============================================================================ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tune-trials", type=int, default=64, help="MetaSchedule trials per model and batch")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (25 calls each at batch 1)")
    p.add_argument("--keep-tune-db", action="store_true",
                   help="reuse the tuning databases of an earlier run (default: tune from scratch, so the "
                        "tuning time reported is this run's)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="a subset of the models (results then go to bench/results-MODELS.*)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    whole = set(args.models) == set(MODELS)
    stem = "results" if whole else "results-" + "-".join(m for m in MODELS if m in args.models)
    results_json, results_md = RESULTS_JSON.with_name(stem + ".json"), RESULTS_MD.with_name(stem + ".md")
    plan_path = OUT / "plan.json"
    if args.worker is not None:
        rows = measure(json.loads(plan_path.read_text()), args.worker)
        (OUT / f"rows-{args.worker}.json").write_text(json.dumps(rows))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    if not args.keep_tune_db:
        for db in OUT.glob("tune-db-*"):
            shutil.rmtree(db)
    t_start = time.time()
    machine = machine_info()
    cases = []
    for model in args.models:
        onnx = export_onnx(model)
        test_path = OUT / f"{model}-test.npy"
        if not test_path.exists():
            np.save(test_path, dataset_images(model, 32, split="test"))
        for bits in BITS:
            case = prepare_model(model, bits)
            case["onnx"], case["test_images"] = onnx, str(test_path)
            case["builds"] = compile_case(case, args.tune_trials)
            cases.append(case)
    plan_path.write_text(json.dumps({"cases": cases, "rounds": args.rounds}, indent=1))
    import bitserial                    # bench/bitserial.py (bench/ is on sys.path as the script's dir)
    rows, bitserial_rows = [], []
    for threads in THREADS:
        env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        run([sys.executable, "bench/bench.py", "--worker", threads], env=env)
        rows += json.loads((OUT / f"rows-{threads}.json").read_text())
        run([sys.executable, "bench/bitserial.py", "--out", OUT / f"bitserial-{threads}.json", "--threads", threads], env=env)
        bitserial_rows += json.loads((OUT / f"bitserial-{threads}.json").read_text())["rows"]
    add_ratios(rows)
    results = {"machine": machine, "rows": rows, "command": "make bench" if whole else
               f"bench/bench.py --tune-trials {args.tune_trials} --models {' '.join(args.models)}",
               "models": [{k: c[k] for k in ("model", "bits", "storage_bits", "avg_storage_bits")} for c in cases],
               "bitserial": bitserial.summarize(bitserial_rows),
               "notes": (f"Tuning: {args.tune_trials} MetaSchedule trials per model and batch. "
                         f"Total bench time {time.time() - t_start:.0f} s."),
               "seconds": round(time.time() - t_start, 1)}
    results_json.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, results_md)
    log(f"wrote {results_json} and {results_md}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
