"""`mixq <command>`: one entry point; each command lives in its stage's module.

Errors a user can cause (bad options, files, data, boards) are `MixqError`s (mixq/errors.py):
they end as one line on stderr, `mixq CMD: error: ...`, and exit 2. Anything else is a bug (in
mixq, torch or TVM: TVM's InternalError is a RuntimeError) and ends with its traceback.
MIXQ_DEBUG=1 prints the traceback of user errors too."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from mixq.errors import MixqError

# command -> module exposing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "train": ("mixq.train_command", "train a quantized model (CSQ; peers BSQ, CLADO; STE- and CSQ-uniform)"),
    "freeze": ("mixq.freeze", "harden a checkpoint into an integer-only graph"),
    "eval": ("mixq.evaluate", "run the golden NumPy interpreter on a dataset"),
    "inspect": ("mixq.inspect", "table of a frozen model's layers, bits and bytes"),
    "export-onnx": ("mixq.onnx_export", "export a frozen model as a QDQ ONNX model"),
    "compile": ("mixq.compile.cli", "compile a frozen model with TVM for a target"),
    "deploy": ("mixq.runtime.cli", "run a compiled model locally or on a board: exactness, accuracy, latency"),
    "report": ("mixq.report", "runs side by side (methods, budgets, deployments) and the accuracy-size plot"),
    "sweep": ("mixq.sweep", "train, freeze and deploy a grid of methods x budgets; the accuracy-size Pareto table and plot"),
    "sensitivity": ("mixq.train.sensitivity", "per-layer loss change of a mixed run when one layer loses or gains a bit"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the stage being run (TVM and torch are slow to import)
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130
    except MixqError as e:
        if os.environ.get("MIXQ_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mixq {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
