"""`mixq eval FROZEN_DIR --dataset D`: top-1 of the golden NumPy interpreter on the test split."""
from __future__ import annotations

import json
import time

import numpy as np

from mixq import data as datasets
from mixq import graph as G
from mixq.errors import MixqError


def golden_logits(g: G.IntGraph, x_float: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return G.run_batched(g, G.quantize_input(g.input, x_float), batch_size)


def add_arguments(p):
    p.add_argument("frozen_dir")
    p.add_argument("--dataset", default=None, help="defaults to the dataset the model was trained on")
    p.add_argument("--data-dir", default=None, help="defaults to the training run's (recorded by freeze)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test images")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    g = G.load(args.frozen_dir)
    spec = datasets.model_test_split(g.meta, g.input.shape, g.tensors[g.output].shape, args.dataset,
                                     args.data_dir, where=args.frozen_dir)
    name = spec.name
    if args.limit is not None and args.limit < 1:
        raise MixqError(f"--limit {args.limit}: must be >= 1")
    x, y = datasets.test_arrays(spec, args.limit)
    t0 = time.time()
    pred = golden_logits(g, x).argmax(1)
    res = {"accuracy": 100.0 * float((pred == y).mean()), "images": int(len(y)), "dataset": name,
           "model": g.model, "seconds": round(time.time() - t0, 3)}
    print(json.dumps(res) if args.json else
          f"{g.model} on {name}: top-1 {res['accuracy']:.2f}% over {res['images']} images (golden interpreter)")
    return 0
