"""The spine on digits: train a few epochs, freeze, golden interpreter == integer simulation."""
import json
import subprocess
import sys

import numpy as np

from mixq import data, graph as G, intsim
from mixq.evaluate import golden_logits


def test_train_freeze_golden_matches_intsim(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mixq.cli", "train", "--epochs", "3", "--out", str(run)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["layers"]) == 5
    r = subprocess.run([sys.executable, "-m", "mixq.cli", "freeze", str(run / "checkpoint.pt"), "--out", str(tmp_path / "frozen")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    g = G.load(tmp_path / "frozen")
    x, _ = data.test_arrays(data.load("digits"))
    gold = golden_logits(g, x)
    sim = intsim.IntSim(g)(G.quantize_input(g.input, x)).numpy()
    assert gold.dtype == np.int32 and np.array_equal(gold, sim)
