"""`make study`: the CSQ paper's trends (Tables IV and V) on real CIFAR-10 at CPU scale.

One grid on ResNet-20, every row with the same training images, test set, epochs, batch and
activation bits; each row is trained with `mixq train`, frozen, compiled for the host and
deployed (bit-exact check and accuracy of the integer program on the whole test set):

    Table IV   ste-uniform and csq-uniform at --weight-bits 2, 3, 4
    Table V    csq at --target-bits 1..5
    peers      bsq and clado at --target-bits 2, 3
    recipes    csq --recipe paper at --target-bits 3 (the paper's optimizer, batch, init and
               fixed shortcuts; the study's epochs and images), beside mixq's default recipe

Runs live in ~/.cache/mixq/study (outside the work tree: a study spans sessions and checkouts).
Resumable at every level: a row with a deploy report is done; a row with a checkpoint resumes
its training (`mixq train --resume`, epoch by epoch); a killed study restarts where it stopped.
A row already in docs/study.json with the same settings (epochs, images, batch, act bits) is
kept as recorded when its run directory is gone: a study outlives the machine it started on,
and its committed rows are the record (delete the row from docs/study.json to train it again).
After the seed-0 grid, the rows of every comparison closer than a point get a second seed.
docs/study.json, docs/study.md and docs/study.png are rewritten after every row, so a partial
study shows what is done. Each row names the machine it was trained on (sessions get fresh
machines, Intel or AMD, so a study's rows may come from several; the top-level `machine` lists
them); a row recorded before rows named theirs takes the file's machine of that time.

    python bench/study.py [--epochs E] [--train-images N] [--runs DIR] [--data PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mixq import fsio
from mixq.errors import MixqError

ROOT = Path(__file__).resolve().parents[1]
MIXQ = [sys.executable, "-m", "mixq.cli"]

# a row: (method, target bits, weight bits, recipe)
TABLE_IV = [(m, None, k, "mixq") for m in ("ste-uniform", "csq-uniform") for k in (2, 3, 4)]
TABLE_V = [("csq", t, None, "mixq") for t in (1, 2, 3, 4, 5)]
PEERS = [(m, t, None, "mixq") for m in ("bsq", "clado") for t in (2, 3)]
RECIPES = [("csq", 3, None, "paper")]
GRID = TABLE_IV + TABLE_V + PEERS + RECIPES
CSQ3 = ("csq", 3, None, "mixq")
# the order rows are trained in: the comparisons the study is about first, so that a partial
# study already answers them (CSQ's peers before CSQ T3 itself)
FIRST = [("ste-uniform", None, 4, "mixq"), ("bsq", 3, None, "mixq"), ("clado", 3, None, "mixq"), CSQ3,
         ("csq-uniform", None, 4, "mixq"), ("csq", 2, None, "mixq"), ("csq", 4, None, "mixq")]
# then the rows CSQ's defaults do not touch (STE, BSQ, CLADO), then the CSQ family: a change of
# CSQ's defaults found while the study runs retrains only rows not yet started
NOT_CSQ = [spec for spec in GRID if spec not in FIRST and not spec[0].startswith("csq")]
RUN_ORDER = FIRST + NOT_CSQ + [spec for spec in GRID if spec not in FIRST + NOT_CSQ]
# pairs whose order the study is about: a second seed for both when they are within a point
PAIRS = ([(CSQ3, ("ste-uniform", None, 4, "mixq")), (CSQ3, ("bsq", 3, None, "mixq")),
          (CSQ3, ("clado", 3, None, "mixq")), (CSQ3, RECIPES[0])]
         + [(("csq", t, None, "mixq"), ("csq", t + 1, None, "mixq")) for t in (1, 2, 3, 4)]
         + [(("ste-uniform", None, k, "mixq"), ("csq-uniform", None, k, "mixq")) for k in (2, 3, 4)])
CLOSE = 1.0     # accuracy points


class StudyError(MixqError, RuntimeError):
    """The study's results could not be written (a full disk, no permission), in one line."""


def row_name(method, target, wbits, recipe, seed) -> str:
    tag = "" if recipe == "mixq" else f"-{recipe}"
    return f"{method}{tag}-{'t%g' % target if target is not None else 'w%d' % wbits}-s{seed}"


def machine() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    from machine import cpu_name
    return f"{cpu_name()}, {os.cpu_count()} cores, no GPU"


def run(cmd, log: Path, stop_on_failure: bool = True) -> int:
    """Run one mixq command, appending its output to the row's log; a failure stops the study
    unless the caller reads the exit status itself."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        # progress bars redrawn once a minute: the log stays small
        env = {**os.environ, "TQDM_MININTERVAL": "60"}
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if rc != 0 and stop_on_failure:
        sys.exit(f"study: `{' '.join(map(str, cmd[2:5]))} ...` failed (exit {rc}); see {log}")
    return rc


def do_row(spec, seed, args) -> dict:
    method, target, wbits, recipe = spec
    d = args.runs / row_name(method, target, wbits, recipe, seed)
    d.mkdir(parents=True, exist_ok=True)
    log = d / "study.log"
    if not (d / "metrics.json").exists():
        cmd = MIXQ + ["train", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", args.data,
                      "--method", method, "--recipe", recipe, "--epochs", args.epochs,
                      "--act-bits", args.act_bits, "--train-subset", args.train_images, "--seed", seed,
                      "--history-test-images", args.history_test_images, "--out", d]
        cmd += ["--target-bits", target] if target is not None else ["--weight-bits", wbits]
        if recipe == "mixq":            # the paper recipe keeps its own batch (256)
            cmd += ["--batch-size", args.batch_size]
        if (d / "checkpoint.pt").exists() or (d / "warmup" / "checkpoint.pt").exists():
            cmd.append("--resume")
        print(f"study: training {d.name}", flush=True)
        run(cmd, log)
    build = d / "build-host"
    if not (build / "report.json").exists():
        if not (d / "frozen" / "manifest.json").exists():
            run(MIXQ + ["freeze", d / "checkpoint.pt", "--out", d / "frozen"], log)
        if not (build / "deploy.json").exists():
            run(MIXQ + ["compile", d / "frozen", "--target", "host", "--out", build], log)
        print(f"study: deploying {d.name}", flush=True)
        # exit 1 = not bit-exact: recorded in the row, not a reason to stop the study
        run(MIXQ + ["deploy", build, "--data-dir", args.data, "--no-progress"], log, stop_on_failure=False)
        if not (build / "report.json").exists():
            sys.exit(f"study: deploy of {d.name} wrote no report; see {log}")
    m = json.loads((d / "metrics.json").read_text())
    rep = json.loads((build / "report.json").read_text())
    return {"method": method, "recipe": recipe, "target_bits": target, "weight_bits": wbits, "act_bits": m["act_bits"],
            "seed": seed, "accuracy": m["accuracy"], "relaxed_accuracy": m.get("relaxed_accuracy"),
            "avg_bits": m["avg_bits"], "paper_comp": m.get("paper_comp"), "storage_bits": m["storage_bits"],
            "int_accuracy": rep["accuracy"], "bit_exact": rep["bit_exact"],
            "undecided_bits": m.get("undecided_bits"), "undecided_masks": m.get("undecided_masks"),
            "train_seconds": m["train_seconds"], "run": d.name, "machine": machine()}


def recorded(args) -> dict:
    """The rows of a previous docs/study.json measured with these settings, by (spec, seed)."""
    try:
        meta = json.loads((args.out / "study.json").read_text())
    except (OSError, ValueError):
        return {}
    same = all(meta.get(k) == getattr(args, k) for k in ("epochs", "train_images", "batch_size", "act_bits"))
    # rows written before each row named its machine: the file's one machine then
    return {(key(r), r["seed"]): {"machine": meta.get("machine"), **r} for r in meta.get("rows", [])} if same else {}


def key(row) -> tuple:
    return row["method"], row["target_bits"], row["weight_bits"], row["recipe"]


def second_seeds(rows) -> list:
    acc = {key(r): r["accuracy"] for r in rows if r["seed"] == 0}
    want = []
    for a, b in PAIRS:
        if a in acc and b in acc and abs(acc[a] - acc[b]) < CLOSE:
            want += [s for s in (a, b) if s not in want]
    return want


def write(rows, args):
    rows = sorted(rows, key=lambda r: (GRID.index(key(r)), r["seed"]))       # table order
    meta = {"model": "resnet20", "dataset": "cifar10 (JPEG re-encoding, shared/data/cifar10-jpeg.tar.gz)",
            "epochs": args.epochs, "batch_size": args.batch_size, "train_images": args.train_images,
            "test_images": 10000, "act_bits": args.act_bits,
            "machine": "; ".join(dict.fromkeys(r["machine"] for r in rows if r.get("machine"))) or machine(),
            "command": f"make study STUDY_EPOCHS={args.epochs} STUDY_TRAIN_IMAGES={args.train_images}",
            "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows_planned": len(GRID), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    fsio.write_text(args.out / "study.json", json.dumps(meta, indent=1) + "\n", StudyError)
    lines = [f"# CSQ study: ResNet-20 on CIFAR-10 at CPU scale", "",
             f"`{meta['command']}` on {meta['machine']}; {args.train_images} training images, the full "
             f"10,000-image test set, {args.epochs} epochs, batch {args.batch_size} (the paper recipe: 256), "
             f"A{args.act_bits}, "
             f"every row alike. Updated {meta['updated']}; {len({key(r) for r in rows})} of {len(GRID)} rows done.", "",
             "| method | recipe | target | weight bits | seed | accuracy % | relaxed % | integer % | bit-exact | avg bits | paper Comp | storage bits | trained on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="%.2f": "" if v is None else (f % v)
    for r in rows:
        lines.append(f"| {r['method']} | {r['recipe']} | {fmt(r['target_bits'], '%g')} | {fmt(r['weight_bits'], '%d')} | {r['seed']} | "
                     f"{fmt(r['accuracy'])} | {fmt(r['relaxed_accuracy'])} | {fmt(r['int_accuracy'])} | "
                     f"{'yes' if r['bit_exact'] else 'NO'} | {fmt(r['avg_bits'])} | {fmt(r['paper_comp'], '%.1f')} | "
                     f"{fmt(r['storage_bits'])} | {(r.get('machine') or '').split(',')[0]} |")
    lines += ["", "## The issue's targets, as measured (mean over seeds)", ""] + checks(rows)
    fsio.write_text(args.out / "study.md", "\n".join(lines) + "\n", StudyError)
    plot(rows, args.out / "study.png")


def checks(rows) -> list:
    """The study's targets, each as one line: met, missed (with the figures), or not yet run."""
    acc, bits = {}, {}
    for r in rows:
        acc.setdefault(key(r), []).append(r["accuracy"])
        bits[key(r)] = r["avg_bits"]
    mean = lambda k: sum(acc[k]) / len(acc[k]) if k in acc else None
    out = []
    for t in (2, 3, 4, 5):
        k = ("csq", t, None, "mixq")
        if k in bits:
            ok = abs(bits[k] - t) <= 0.1
            out.append(f"- csq T{t} lands within 0.1 of the target: {'met' if ok else 'MISSED'} ({bits[k]:.2f} bits)")
    a3 = mean(CSQ3)
    for other, margin, what in ((("ste-uniform", None, 4, "mixq"), 2, "ste-uniform W4 (same storage) minus 2"),
                                (("bsq", 3, None, "mixq"), 1, "bsq T3 minus 1"),
                                (("clado", 3, None, "mixq"), 1, "clado T3 minus 1")):
        b = mean(other)
        if a3 is not None and b is not None:
            ok = a3 >= b - margin
            out.append(f"- csq T3 at least {what}: {'met' if ok else 'MISSED'} ({a3:.2f} vs {b:.2f})")
    curve = [(t, mean(("csq", t, None, "mixq"))) for t in (1, 2, 3, 4, 5) if mean(("csq", t, None, "mixq")) is not None]
    if len(curve) > 1:
        drops = [(a, b) for (a, b) in zip(curve, curve[1:]) if b[1] < a[1] - CLOSE]
        out.append(f"- csq accuracy rises with the target within noise ({CLOSE} point): "
                   + ("met" if not drops else "MISSED") + " (" + ", ".join(f"T{t} {v:.2f}" for t, v in curve) + ")")
    paper = mean(RECIPES[0])
    if a3 is not None and paper is not None:
        out.append(f"- recipes at T3: mixq {a3:.2f}, paper {paper:.2f}")
    return out or ["- nothing measured yet"]


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"csq": "o-", "csq-uniform": "s--", "ste-uniform": "^--", "bsq": "D", "clado": "v"}
    for method, style in styles.items():
        pts = sorted((r["storage_bits"], r["accuracy"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), style, label=method, ms=6)
    ax.set(xlabel="storage bits per weight (span + sign)", ylabel="top-1 accuracy % (hardened)",
           title="ResNet-20, CIFAR-10: accuracy vs weight size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fsio.save_png(fig, path, StudyError)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--history-test-images", type=int, default=2000,
                   help="per-epoch history rows on the first N test images (the final figures use all 10,000)")
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    # outside the work tree: a study spans sessions, and a new checkout must not lose its runs
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq")) / "study")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"study: {args.data}: no CIFAR-10 data (pass --data or set STUDY_DATA)")
    done, rows = recorded(args), []
    for seed, specs in ((0, RUN_ORDER), (1, None)):
        for spec in specs if specs is not None else second_seeds(rows):
            name = row_name(*spec, seed)
            if (spec, seed) in done and not (args.runs / name / "build-host" / "report.json").exists():
                print(f"study: {name} kept from {args.out / 'study.json'} (its run directory is gone)", flush=True)
                rows.append(done[spec, seed])
            else:
                rows.append(do_row(spec, seed, args))
            write(rows, args)
    print(f"study: {len(rows)} rows in {args.out / 'study.md'}")


if __name__ == "__main__":
    main()
