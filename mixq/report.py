"""`mixq report RUN_DIR...`: runs side by side (methods, budgets), and the accuracy-size curve.

For each run directory: its metrics.json (mixq train), and where present the deploy reports
of its builds (RUN_DIR/build-*/report.json from mixq deploy). Prints one table; --md writes it
as markdown, --png the accuracy vs weight size plot (one series per method), --json the rows.
"""
from __future__ import annotations

import json
from pathlib import Path

from mixq import fsio
from mixq.errors import MixqError

COLUMNS = [("run", "run"), ("method", "method"), ("target", "target"), ("avg bits", "avg_bits"),
           ("storage bits", "storage_bits"), ("weights KiB", "weight_kib"), ("GBOPs", "gbops"),
           ("compression", "compression"),
           ("accuracy %", "accuracy"), ("integer %", "int_accuracy"), ("deployed", "deployed")]


def add_arguments(p):
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.json from mixq train)")
    p.add_argument("--md", help="also write the table as markdown to this file")
    p.add_argument("--png", help="also write the accuracy vs weight-size plot to this PNG")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def _target(m: dict):
    """The run's budget as given: target bits (--target-bits, bits=T) or the size / bops budget."""
    budget = m.get("budget")
    return budget if budget and not budget.startswith("bits=") else m["target_bits"]


def load_row(run: Path) -> dict:
    path = run / "metrics.json"
    if not path.is_file():
        raise MixqError(f"{run}: no metrics.json (not a finished mixq train run directory)")
    try:
        m = json.loads(path.read_text())
        row = {"run": run.name, "model": m["model"], "dataset": m["dataset"], "method": m["method"],
               "target": _target(m), "act_bits": m["act_bits"], "avg_bits": m["avg_bits"],
               "storage_bits": m["storage_bits"], "compression": m["compression"],
               "weight_kib": m.get("weight_kib") or m["params"] * m["storage_bits"] / 8 / 1024,
               "gbops": m.get("gbops"),
               "accuracy": m["accuracy"], "int_accuracy": m.get("int_accuracy"), "deployments": []}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MixqError(f"{path}: not a mixq metrics file ({type(e).__name__}: {e})") from None
    for rep in sorted(run.glob("build-*/report.json")):
        try:
            r = json.loads(rep.read_text())
            row["deployments"].append({"build": rep.parent.name, "arch": r["arch"], "bit_exact": r["bit_exact"],
                                       "accuracy": r["accuracy"], "latency_ms": r["latency_ms"]["median"],
                                       "emulated": r.get("emulated", False)})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MixqError(f"{rep}: not a mixq deploy report ({type(e).__name__})") from None
    return row


def cell(row: dict, key: str) -> str:
    v = row.get(key)
    if key == "bit_exact":
        return ("yes" if all(d["bit_exact"] for d in row["deployments"]) else "NO") if row.get("deployments") else "-"
    if key == "front":
        return "*" if v else ""
    if key == "deployed":
        return "; ".join(f"{d['arch']} {'exact' if d['bit_exact'] else 'NOT EXACT'} {d['latency_ms']:.3f} ms"
                         + (" (emulated)" if d["emulated"] else "") for d in row["deployments"]) or "-"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if key == "gbops" else f"{v:.2f}"
    return str(v)


def table(rows: list, columns=COLUMNS) -> list:
    return [[cell(r, key) for _, key in columns] for r in rows]


def text_table(rows: list, columns=COLUMNS) -> str:
    body = table(rows, columns)
    heads = [h for h, _ in columns]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(heads), "  ".join("-" * w for w in widths)] + [line(c) for c in body])


def markdown(rows: list, columns=COLUMNS) -> str:
    heads = [h for h, _ in columns]
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    out += ["| " + " | ".join(c) + " |" for c in table(rows, columns)]
    return "\n".join(out) + "\n"


def pareto_front(rows: list) -> list:
    """Per row, whether it is on the accuracy-size Pareto front: no other row is at most as
    large (weight_kib) and at least as accurate (accuracy), and better in one of the two."""
    def beaten(r):
        return any(o["weight_kib"] <= r["weight_kib"] and o["accuracy"] >= r["accuracy"]
                   and (o["weight_kib"], o["accuracy"]) != (r["weight_kib"], r["accuracy"]) for o in rows)
    return [not beaten(r) for r in rows]


def plot(rows: list, path: Path, references=(), title: str | None = None):
    """Accuracy vs packed weight size, one line per method, each point labelled with its mean
    precision; rows with "front" true ringed; references: (label, accuracy) horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["weight_kib"], r["accuracy"], r["avg_bits"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        for x, y, b in pts:
            ax.annotate(f"{b:.2f}b", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    front = [r for r in rows if r.get("front")]
    if front:
        ax.plot([r["weight_kib"] for r in front], [r["accuracy"] for r in front], "o", ms=12, mfc="none",
                mec="k", mew=1, label="Pareto front")
    for (label, accuracy), style in zip(references, ("--", ":", "-.")):
        ax.axhline(accuracy, color="gray", ls=style, lw=1.2, label=label)
    models = sorted({r["model"] for r in rows})
    ax.set(xlabel="weights (KiB, packed at storage bits)", ylabel="top-1 accuracy (%)",
           title=title or f"accuracy vs size: {', '.join(models)}")
    ax.grid(alpha=0.3)
    if references:              # below the axes: the lines run across the whole plot
        fig.set_size_inches(7, 5.5)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fsio.save_png(fig, path, MixqError)


def run(args) -> int:
    rows = [load_row(Path(r)) for r in args.runs]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(text_table(rows))
    if args.md:
        fsio.write_text(Path(args.md), markdown(rows), MixqError)
    if args.png:
        plot(rows, Path(args.png))
    return 0
