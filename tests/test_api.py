"""The Python API (mixq/api.py): the README's example end to end, a user's own training loop,
and the errors a caller can cause."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq import api as mq, graph as G
from mixq.freeze import FreezeError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_trains_freezes_compiles_and_deploys_bit_exact(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ns = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), ns)        # noqa: S102 - our own README
    out = capsys.readouterr().out
    m, report = ns["metrics"], ns["report"]
    assert report["bit_exact"] is True
    assert report["accuracy"] == report["reference_accuracy"] == pytest.approx(m["int_accuracy"]), (report, m)
    assert m["accuracy"] >= 90 and abs(m["avg_bits"] - 3) <= 0.5, m
    assert "bit-exact vs golden interpreter: yes (360 images)" in out, out
    for f in ("metrics.json", "history.csv", "precision.png", "frozen/manifest.json", "build/report.json"):
        assert (tmp_path / "api-run" / f).is_file(), f
    frozen = json.loads((tmp_path / "api-run" / "frozen" / "manifest.json").read_text())
    assert frozen["meta"]["training"]["accuracy"] == m["accuracy"]


class Tiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def digits_tensors():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.5) / 0.5
    return x, torch.tensor(d.target)


def test_a_users_own_loop_drives_the_method_through_its_hooks():
    x, y = digits_tensors()
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    q = mq.prepare(model, method="csq", target_bits=3, epochs=6, example_input=x[:1437])
    assert q.config.num_classes == 10 and q.config.input_shape == (1, 8, 8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())      # the user's net stays float
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1437], y[:1437]), 64, shuffle=True)
    opts, scheds = q.optimizers(len(loader))
    betas, searching = [], []
    for epoch in range(q.config.epochs):
        q.train()
        q.harden(False)
        q.on_epoch(epoch)
        for i, (xb, yb) in enumerate(loader):
            q.on_step(epoch + i / len(loader))
            reg = q.regularizer()
            searching.append(bool(reg.requires_grad))
            loss = F.cross_entropy(q(xb), yb) + reg
            for o in opts.values():
                o.zero_grad()
            loss.backward()
            for k in opts:
                opts[k].step()
                scheds[k].step()
            q.after_step()
        betas.append(float(q.method.beta))
    # the budget term acts while the mask is searched (not in the finetune epoch); beta grows
    assert searching[0] and not searching[-1] and betas == sorted(betas) and betas[-1] > betas[0], (searching, betas)
    q.harden(True)
    q.eval()
    graph = mq.freeze(q)
    with torch.no_grad():
        torch_pred = q(x[1437:]).argmax(1).numpy()
    int_pred = G.run(graph, G.quantize_input(graph.input, x[1437:].numpy())).argmax(1)
    assert (int_pred == y[1437:].numpy()).mean() > 0.5                    # it learned, in integers
    assert (int_pred == torch_pred).mean() >= 0.95                         # and computes what the model computes


class SoftmaxNet(Tiny):
    """Softmax over the channels: not elementwise, so no table (F.gelu here would be one)."""

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.softmax(self.conv(x), 1), 2).flatten(1))


@pytest.mark.parametrize("call, error, message", [
    (lambda x, y: mq.prepare(SoftmaxNet(), example_input=x), FreezeError,
     "cannot become an integer program, nothing was trained; 1 problem: operation 'softmax' (torch.softmax in 'net')"),
    (lambda x, y: mq.prepare(Tiny(), method="nosuch", example_input=x), mq.APIError, "--method nosuch: unknown"),
    (lambda x, y: mq.prepare(Tiny(), target_bits=9, example_input=x), mq.APIError, "--target-bits 9: must be in (0, 8]"),
    (lambda x, y: mq.prepare(Tiny(), example_input=x, learning_rate=0.1), mq.APIError, "unknown option learning_rate"),
    (lambda x, y: mq.prepare(Tiny()), mq.APIError, "example_input: a batch of training images"),
    (lambda x, y: mq.prepare("resnet20", example_input=x), mq.APIError, "model: expected a torch nn.Module, got str"),
    (lambda x, y: mq.prepare(Tiny(), method="bsq", example_input=x), mq.APIError,
     "example_labels: method 'bsq' needs the labels"),
    (lambda x, y: mq.prepare(Tiny(), example_input=x, example_labels=y[:3]), mq.APIError, "3 labels for 64 example images"),
    (lambda x, y: mq.prepare(Tiny(), example_input=torch.zeros(4, 3, 8, 8)), mq.APIError,
     "model: does not take example_input of shape (4, 3, 8, 8)"),
    (lambda x, y: mq.fit(Tiny(), [], []), mq.APIError, "q: expected what mixq.api.prepare returns, got Tiny"),
    (lambda x, y: mq.compile(None), mq.APIError, "out: the build directory to write is needed"),
])
def test_bad_calls_are_one_line_naming_the_argument(call, error, message):
    x, y = digits_tensors()
    with pytest.raises(error) as e:
        call(x[:64], y[:64])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_test_data_that_does_not_fit_the_build_is_refused(tmp_path):
    from mixq.runtime.deploy import DeployError, user_test_split
    record = {"input": {"shape": [1, 8, 8]}}
    name, x, y = user_test_split(record, (torch.zeros(5, 1, 8, 8), np.arange(5)))
    assert name == "user data" and x.dtype == np.float32 and y.tolist() == list(range(5))
    with pytest.raises(DeployError, match=r"images of shape \(5, 3, 8, 8\) and 5 labels do not fit the model's input \(1, 8, 8\)"):
        user_test_split(record, (np.zeros((5, 3, 8, 8)), np.arange(5)))


def test_the_user_model_net_trains_through_the_api_and_deploys_bit_exact(tmp_path, monkeypatch):
    """tests/test_user_model.py's RichNet (linear bottleneck + residual, depthwise-separable
    blocks, ReLU6, functional relu, max pool, MLP head), the net its CLI test trains, here
    through the Python API with CSQ on digits."""
    from mixq import data
    from test_user_model import NET
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ns = {}
    exec(NET, ns)                                   # noqa: S102 - the test's own net
    spec = data.load("digits")
    (xtr, ytr), (xte, yte) = spec.train.tensors, spec.test.tensors
    torch.manual_seed(0)
    q = mq.prepare(ns["rich_net"](10), method="csq", target_bits=3, epochs=10, example_input=xtr, example_labels=ytr)
    m = mq.fit(q, torch.utils.data.DataLoader(spec.train, 64, shuffle=True), torch.utils.data.DataLoader(spec.test, 512))
    assert m["accuracy"] > 50 and abs(m["avg_bits"] - 3) <= 0.5, m
    graph = mq.freeze(q)
    assert any(o.attrs.get("out_signed") for o in graph.ops)           # the bottleneck's residual sum
    build = mq.compile(graph, out=tmp_path / "build", log=lambda *a: None)
    report = mq.deploy(build, test=(xte, yte), repeat=3, log=lambda *a: None)
    assert report["bit_exact"] is True and report["images_checked"] == len(yte) == 360
    assert report["accuracy"] == pytest.approx(m["int_accuracy"])
