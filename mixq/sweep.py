"""`mixq sweep`: a grid of mixed-precision methods x budgets on one model and data set, each
trained, frozen, compiled for the host and deployed; then the accuracy-vs-size Pareto table and
plot, with a float and a uniform 8-bit reference.

    mixq sweep --model M --dataset D --methods csq,bsq,clado --budgets size=16,20,28 --out DIR
               [--epochs E --train-subset N --test-subset N --batch-size B --act-bits A ...]

DIR/METHOD-MEASUREVALUE/ (e.g. csq-size20) is each grid point's `mixq train` run directory, with
frozen/ and build-host/ in it as `mixq freeze`, `compile` and `deploy` write them (so `mixq
report`, `mixq inspect` and `mixq sensitivity` read them as any run). --results PREFIX (default
DIR/sweep) gets PREFIX.md (the table: method, budget, KiB, bits, GBOPs, accuracy, integer
accuracy, bit-exact, Pareto front), PREFIX.png (accuracy vs KiB, a line per method, the
references as horizontal lines) and PREFIX.json, rewritten after every run: a partial sweep shows
what is done. The table and plot are `mixq report`'s (mixq/report.py), with two more columns.

The methods are the registry's mixed ones (train/methods: `Method.mixed`), so a method
registered later sweeps as they do. The references, trained with the same options:
- uniform 8-bit: `ste-uniform --weight-bits 8 --act-bits 8`, frozen and deployed like the grid;
- float: mixq trains no float network (every weight layer of a run is a method's quantized
  layer: freeze reads its integers), so the reference is the nearest run it has,
  `ste-uniform --weight-bits 8 --act-bits 32`: float activations and 8-bit weights on a
  per-layer scale (how far that is from a float32 network is not measured). It has no integer
  program (float activations), so it is trained and not deployed.

Resumable at every step, each step's artifact being written whole or not at all (mixq/fsio.py):
a run with metrics.json is trained (its configuration must be the sweep's, else one line before
anything runs); a killed training resumes from its checkpoint, epoch by epoch (`mixq train
--resume`); frozen/manifest.json, build-host/deploy.json and build-host/report.json each mark
their step done, a step killed midway left none of them and is redone; a retrained run's old
frozen model and builds are removed first. Everything is checked before the first run starts,
one line and exit 2: an unknown method or one that is not mixed (ste-uniform, csq-uniform), a
budget that does not parse or that nothing can meet, a training option a run would refuse. A
run that fails later (a NaN loss...) is reported in the table and the sweep goes on; the exit
status is then 1, as it is when a deployment is not bit-exact."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mixq import fsio, report
from mixq.errors import MixqError

# training options passed through to every run (each as `mixq train` takes it)
TRAIN_OPTIONS = (("--epochs", int), ("--finetune-epochs", int), ("--batch-size", int), ("--lr", float),
                 ("--seed", int), ("--train-subset", int), ("--test-subset", int),
                 ("--history-test-images", int), ("--act-bits", int), ("--recipe", str), ("--device", str),
                 ("--data-dir", str), ("--input-size", str))
COLUMNS = [("method", "method"), ("budget", "target"), ("weights KiB", "weight_kib"), ("avg bits", "avg_bits"),
           ("storage bits", "storage_bits"), ("GBOPs", "gbops"), ("accuracy %", "accuracy"),
           ("integer %", "int_accuracy"), ("bit-exact", "bit_exact"), ("Pareto", "front")]
REFERENCE_COLUMNS = [("reference", "label"), ("run", "run"), ("weights KiB", "weight_kib"),
                     ("accuracy %", "accuracy"), ("integer %", "int_accuracy"), ("bit-exact", "bit_exact")]
UNIFORM8 = "uniform 8-bit (W8A8)"
FLOAT = "float (8-bit weights, float activations)"


class SweepError(MixqError, ValueError):
    """A bad --methods, --budgets or option, or a run directory of another configuration."""


@dataclass
class Point:
    """One run of the sweep: its directory name, its role (grid point or reference) and config."""
    name: str
    role: str                   # "grid", UNIFORM8 or FLOAT
    cfg: object                 # train.config.TrainConfig
    budget: object = None       # train.budget.Budget of a grid point

    @property
    def deploys(self) -> bool:
        return self.cfg.act_bits <= 8           # float activations have no integer program


def add_arguments(p):
    p.add_argument("--model", default="digits-cnn", help="as mixq train --model")
    p.add_argument("--dataset", default="digits", help="as mixq train --dataset")
    p.add_argument("--methods", required=True,
                   help="comma-separated mixed methods, e.g. csq,bsq,clado (any registered mixed method)")
    p.add_argument("--budgets", required=True, nargs="+", metavar="MEASURE=V[,V...]",
                   help="budgets as --budget takes them, values of one measure comma-separated: "
                        "size=16,20,28 (KiB), bits=2,3,4 (mean precision), bops=0.02,0.03 (GBOPs); several allowed")
    p.add_argument("--out", required=True, help="sweep directory: one run directory per method and budget")
    p.add_argument("--results", default=None, metavar="PREFIX",
                   help="write the table, plot and rows to PREFIX.md, .png, .json (default: OUT/sweep)")
    p.add_argument("--no-references", action="store_true",
                   help="skip the float and uniform 8-bit reference runs")
    group = p.add_argument_group("training options, passed to every run (see mixq train --help)")
    for flag, kind in TRAIN_OPTIONS:
        group.add_argument(flag, type=kind, default=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- the plan
def parse_methods(text: str) -> list:
    from mixq.train.methods import METHODS
    mixed = [n for n, m in METHODS.items() if m.mixed]
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise SweepError(f"--methods {text!r}: name at least one of {', '.join(mixed)}")
    for n in names:
        if n not in METHODS:
            raise SweepError(f"--methods {n}: unknown method (the mixed ones: {', '.join(mixed)})")
        if n not in mixed:
            raise SweepError(f"--methods {n}: not a mixed-precision method (it takes one --weight-bits; "
                             f"the mixed ones: {', '.join(mixed)}); the sweep trains its references itself")
    return names


def parse_budgets(items: list) -> list:
    """[Budget] of MEASURE=V[,V...] items, in the order given, without repeats."""
    from mixq.train.budget import Budget
    from mixq.train.errors import ConfigError
    budgets = []
    for item in items:
        measure, sep, values = item.partition("=")
        if not sep or not values.strip(","):
            raise SweepError(f"--budgets {item}: expected MEASURE=V[,V...], e.g. size=16,20,28")
        for v in values.split(","):
            try:
                b = Budget.parse(f"{measure}={v.strip()}", "--budgets")
            except ConfigError as e:
                raise SweepError(str(e)) from None
            if b not in budgets:
                budgets.append(b)
    return budgets


def run_name(method: str, budget) -> str:
    return f"{method}-{budget.measure}{budget.value:g}"


def plan(args) -> list:
    """The sweep's runs, references first (their lines appear in the first partial plots), then
    the grid budget by budget."""
    from mixq.train import cli as train_cli
    given = {k: v for k, v in vars(args).items() if k in {f.lstrip("-").replace("-", "_") for f, _ in TRAIN_OPTIONS}}
    config = lambda **kw: train_cli.config(argparse.Namespace(model=args.model, dataset=args.dataset, **{**given, **kw}))
    points = []
    if not args.no_references:
        points += [Point("ste-uniform-w8a8", UNIFORM8, config(method="ste-uniform", weight_bits=8, act_bits=8)),
                   Point("ste-uniform-w8a32", FLOAT, config(method="ste-uniform", weight_bits=8, act_bits=32))]
    methods, budgets = parse_methods(args.methods), parse_budgets(args.budgets)
    for b in budgets:
        points += [Point(run_name(m, b), "grid", config(method=m, budget=str(b)), b) for m in methods]
    return points


def check(points: list, out: Path):
    """Everything a run could refuse, before the first one starts: each configuration, each
    budget against the model (as training checks it: train.loop.set_budget), and each existing
    run directory's configuration against the sweep's."""
    from mixq import data as datasets
    from mixq.train import loop
    from mixq.train.checkpoint import config_difference, load_checkpoint
    from mixq.train.config import build
    from mixq.train.errors import ConfigError
    for p in points:
        p.cfg.validate()
    cfg = points[-1].cfg
    spec = datasets.load(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed, cfg.input_size)
    x = datasets.calibration_images(spec, 1)[0]
    built = {}
    for p in points:
        p.cfg.num_classes, p.cfg.input_shape, p.cfg.classes = spec.num_classes, spec.input_shape, spec.classes
        if p.budget is None:
            continue
        if p.cfg.method not in built:
            built[p.cfg.method] = build(p.cfg)
        try:
            loop.set_budget(*built[p.cfg.method], p.cfg, x)
        except ConfigError as e:
            raise SweepError(f"{str(e).replace('--budget ', '--budgets ', 1)} (--method {p.cfg.method})") from None
    for p in points:
        ckpt = out / p.name / "checkpoint.pt"
        if ckpt.exists():
            differ = config_difference(load_checkpoint(ckpt), p.cfg, ckpt)
            if differ:
                raise SweepError(f"{out / p.name}: a run of another configuration ({differ}); "
                                 "remove it or sweep into another --out")


# ----------------------------------------------------------------------------- running
def run_point(p: Point, out: Path, say) -> str:
    """Bring one run to its end, skipping what is done; returns its status ("done" or why not)."""
    from mixq.train import sensitivity
    from mixq.train_command import train
    d = out / p.name
    if (d / "metrics.json").exists():
        say("trained (kept)")
    else:
        for stale in [d / "frozen", *d.glob("build-*")]:       # made from an earlier training
            shutil.rmtree(stale, ignore_errors=True)
        resume = (d / "checkpoint.pt").exists()
        say("training, resumed from its checkpoint" if resume else "training")
        train(p.cfg, str(d), resume=resume)
    if p.budget is not None and not (d / "sensitivity.json").exists():
        say("sensitivity")                      # a run killed between its metrics and its sensitivity
        sensitivity.for_run(d, progress=False)
    if p.deploys:
        deploy_run(d, p.cfg, say)
    return "done"


def deploy_run(d: Path, cfg, say):
    """freeze -> compile for the host -> deploy on the run's test images, each step skipped
    when its artifact is there (none is there unless it was written whole)."""
    from mixq.compile import build as B
    from mixq.freeze import FreezeError, freeze_checkpoint
    from mixq.runtime import deploy as D
    frozen, build = d / "frozen", d / "build-host"
    if (build / "report.json").exists():
        say("deployed (kept)")
        return
    if not (frozen / "manifest.json").exists():
        say("freezing")
        with fsio.DirLock(frozen, FreezeError):
            remove_temporaries(frozen)
            freeze_checkpoint(str(d / "checkpoint.pt"), str(frozen))
    if not (build / B.DEPLOY_JSON).exists():
        say("compiling")
        with fsio.DirLock(build, B.CompileError):
            remove_temporaries(build)
            B.compile_frozen(frozen, "host", build, log=lambda m: None)
    say("deploying")
    r = D.deploy(build, images=cfg.test_subset, progress=False, log=lambda m: None)
    say(f"{'bit-exact' if r['bit_exact'] else 'NOT bit-exact'} on {r['images_checked']} images, "
        f"deployed accuracy {r['accuracy']:.2f} %")


def remove_temporaries(artifact: Path):
    """What a killed freeze or compile left beside its artifact (fsio.atomic_dir's temporary,
    never renamed into place): removed under the artifact's lock before the step is redone."""
    for tmp in artifact.parent.glob(f".{artifact.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- results
def rows_of(points: list, out: Path, status: dict) -> list:
    rows = []
    for p in points:
        d = out / p.name
        if (d / "metrics.json").exists():
            row = report.load_row(d)
        else:
            row = {"run": p.name, "method": p.cfg.method, "target": str(p.budget) if p.budget else None,
                   "deployments": []}
        row.update(role=p.role, status=status.get(p.name, "not run yet"))
        rows.append(row)
    grid = [r for r in rows if r["role"] == "grid" and "accuracy" in r]
    shipped = grid + [r for r in rows if r["role"] == UNIFORM8 and "accuracy" in r]
    for r, front in zip(shipped, report.pareto_front(shipped)):
        r["front"] = front
    return rows


def command(args) -> str:
    parts = ["mixq sweep", f"--model {args.model}", f"--dataset {args.dataset}", f"--methods {args.methods}",
             f"--budgets {' '.join(args.budgets)}"]
    parts += [f"{flag} {getattr(args, flag[2:].replace('-', '_'))}" for flag, _ in TRAIN_OPTIONS
              if hasattr(args, flag[2:].replace("-", "_"))]
    parts += ["--no-references"] * args.no_references + [f"--out {args.out}"]
    return " ".join(parts + ([f"--results {args.results}"] if args.results else []))


def write_results(rows: list, points: list, args, prefix: Path):
    methods = parse_methods(args.methods)
    order = {p.name: (methods.index(p.cfg.method), p.budget.measure, p.budget.value) for p in points if p.budget}
    grid = sorted((r for r in rows if r["role"] == "grid"), key=lambda r: order[r["run"]])      # method by method
    refs = [r for r in rows if r["role"] != "grid"]
    for r in refs:
        r["label"] = r["role"]
    done = [r for r in grid if "accuracy" in r]
    cfg = points[-1].cfg
    settings = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "act_bits", "seed", "train_subset", "test_subset",
                                              "recipe")}
    settings["data_dir"] = getattr(args, "data_dir", None)      # as given: the results may be committed
    meta = {"command": command(args), "model": args.model, "dataset": args.dataset, "settings": settings,
            "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "runs_planned": len(points), "runs_done": sum(r["status"] == "done" for r in rows), "runs": rows}
    fsio.write_text(Path(f"{prefix}.json"), json.dumps(meta, indent=1) + "\n", SweepError)
    images = lambda n: "all" if n is None else f"{n}"
    lines = [f"# Sweep: {args.model} on {args.dataset}", "", f"`{meta['command']}`", "",
             f"{cfg.epochs} epochs, batch {cfg.batch_size}, A{cfg.act_bits} (the grid), {images(cfg.train_subset)} "
             f"training images, {images(cfg.test_subset)} test images, seed {cfg.seed}; "
             f"{meta['runs_done']} of {len(points)} runs done, updated {meta['updated']}.", "",
             "Accuracy: the trained (hardened) network; integer: the same network under the integer contract "
             "(mixq.intsim); bit-exact: the program deployed on the host equals the golden interpreter on every "
             "test image. Pareto *: no other run (the uniform 8-bit reference included) is at most as large and at "
             "least as accurate, and better in one.", "",
             report.markdown(grid, COLUMNS).rstrip()]
    failed = [r for r in rows if r["status"] not in ("done", "not run yet")]
    lines += [""] * bool(failed) + [f"- {r['run']}: {r['status']}" for r in failed]
    if refs:
        lines += ["", "References, with the same training options:", "",
                  report.markdown(refs, REFERENCE_COLUMNS).rstrip()]
    lines += ["", f"![accuracy vs size]({Path(f'{prefix}.png').name})", "",
              "Why each method allocated its bits: RUN/sensitivity.json and .png in each run directory "
              "(the loss change when one layer loses or gains a bit)."]
    fsio.write_text(Path(f"{prefix}.md"), "\n".join(lines) + "\n", SweepError)
    references = [(f"{r['role']}, {r['weight_kib']:.1f} KiB: {r['accuracy']:.2f} %", r["accuracy"])
                  for r in refs if "accuracy" in r]
    if done or references:
        report.plot(done, Path(f"{prefix}.png"), references,
                    title=f"{args.model} on {args.dataset}: accuracy vs size")


def run(args) -> int:
    out = Path(args.out)
    prefix = Path(args.results) if args.results else out / "sweep"
    points = plan(args)
    check(points, out)
    out.mkdir(parents=True, exist_ok=True)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    status = {}
    with fsio.DirLock(out, SweepError):
        for i, p in enumerate(points, 1):
            say = lambda msg, p=p, i=i: print(f"sweep [{i}/{len(points)}] {p.name}: {msg}", flush=True)
            try:
                status[p.name] = run_point(p, out, say)
            except MixqError as e:          # this run only: the others go on (see the docstring)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                status[p.name] = f"failed: {msg}"
                say(status[p.name])
            write_results(rows_of(points, out, status), points, args, prefix)
    rows = rows_of(points, out, status)
    bad = [r["run"] for r in rows if r["status"] != "done" or report.cell(r, "bit_exact") == "NO"]
    print(report.text_table([r for r in rows if "accuracy" in r], [("run", "run")] + COLUMNS))
    print(f"sweep: {len(points) - len(bad)} of {len(points)} runs done"
          + (f"; failed or not bit-exact: {', '.join(bad)}" if bad else "") + f" -> {prefix}.md")
    return 1 if bad else 0
