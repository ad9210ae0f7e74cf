"""The Python API: your own float nn.Module through every stage, in memory or to the artifacts
the CLI writes (frozen/, build/, report.json).

    from mixq import api as mq

    q = mq.prepare(model, method="csq", target_bits=3, act_bits=8, epochs=30,
                   example_input=x_train[:2048], example_labels=y_train[:2048])
    mq.fit(q, train_loader, test_loader)            # mixq's loop; or your own, see QModel
    graph = mq.freeze(q, out="frozen")              # the integer program (mixq.graph.IntGraph)
    build = mq.compile(graph, target="host", out="build")
    report = mq.deploy(build, test=(x_test, y_test))    # bit-exact? accuracy, latency

The verbs are those of the stages and of torch.ao / torchao's QAT flow (prepare, train,
convert): `prepare` returns a new module and leaves `model` as it was (torch.ao's
prepare_qat(inplace=False)); the quantizers it inserts are mixq's (PACT activations, an int8
input, the method's weight layers). They live in `mixq.api` rather than at the top of the
package because `mixq.freeze` and `mixq.compile` are the stage modules of the same names.

Errors a caller can cause (an option out of range, a net freeze cannot take, data that does
not fit the model) are MixqError subclasses with one line naming the argument, as on the CLI
(whose option names they use: --target-bits is target_bits here)."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from mixq import data as datasets, graph as G
from mixq.errors import MixqError
from mixq.train import quant, surgery
from mixq.train.checkpoint import training_facts
from mixq.train.config import TrainConfig
from mixq.train.errors import ConfigError
from mixq.train_command import freezable, integer_metrics


class APIError(MixqError, ValueError):
    """A bad argument to a mixq.api call (one line naming it)."""


class QModel(nn.Module):
    """What `prepare` returns: the quantized network (`model`, a train.quant.QuantModel: the int8
    input quantizer, then your net with the method's weight layers and PACT activations), its
    method (`method`) and configuration (`config`, a TrainConfig). Call it like your net.

    Your own training loop calls the method's hooks, as `fit` does (train.loop.train_epoch):

        opts, scheds = q.optimizers(len(train_loader))      # or your own over q.parameters()
        for epoch in range(q.config.epochs):
            q.train(); q.harden(False); q.on_epoch(epoch)
            for i, (x, y) in enumerate(train_loader):
                q.on_step(epoch + i / len(train_loader))      # CSQ: the temperature schedule
                loss = F.cross_entropy(q(x), y) + q.regularizer()   # CSQ: the budget term
                ...zero_grad, loss.backward(), step every optimizer and scheduler...
                q.after_step()
        q.harden(True)                                        # every gate a step: what freeze exports
    """

    def __init__(self, model: quant.QuantModel, method, config: TrainConfig):
        super().__init__()
        self.model = model
        self.method = method
        self.config = config
        self.history, self.metrics = [], None

    def forward(self, x):
        return self.model(x)

    def on_epoch(self, epoch: int):
        """Start of epoch `epoch` (0-based): BSQ re-quantizes, CLADO allocates bits, ..."""
        self.method.on_epoch(epoch)

    def on_step(self, epoch: float):
        """Before each step, at `epoch` + the fraction of it done: CSQ's beta schedule."""
        self.method.on_step(epoch)

    def regularizer(self) -> torch.Tensor:
        """The method's term to add to the loss (CSQ, BSQ: the bit budget; 0 for the others)."""
        return self.method.regularizer()

    def after_step(self):
        """After each optimizer step (BSQ clips its bit planes)."""
        self.method.after_step()

    def harden(self, hard: bool = True):
        """Every gate a unit step (what freeze exports) or back to the relaxed network."""
        self.method.harden(hard)

    def optimizers(self, steps_per_epoch: int) -> tuple[dict, dict]:
        """mixq's optimizers for this model (train.loop.make_optimizers: SGD on weights, the
        method's choice on bit logits) and their per-step learning-rate schedulers."""
        from mixq.train.loop import lr_factor, make_optimizers
        opts = make_optimizers(self.model, self.config)
        scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps_per_epoch, self.config))
                  for k, o in opts.items()}
        return opts, scheds


def prepare(model: nn.Module, method: str = "csq", target_bits: float = 3.0, act_bits: int = 8,
            example_input: torch.Tensor | None = None, example_labels: torch.Tensor | None = None,
            num_classes: int | None = None, epochs: int = 30, **options) -> QModel:
    """A quantized copy of `model` (a float nn.Module taking NCHW images, returning class
    logits), ready to train with `method` ("csq", "bsq", "clado", "ste-uniform",
    "csq-uniform") at `target_bits` (mixed methods) and `act_bits`.

    example_input: a batch of real training images as the model sees them (normalized), ideally
    a few hundred to 2048: it sets the input shape, the int8 input scale and the activation
    clips (train.loop.calibrate). example_labels: their labels (BSQ and CLADO measure losses on
    them). num_classes: from the model's output on example_input when not given. epochs: the
    length of the training `fit` runs, which the method's schedule spans (CSQ's temperature,
    the finetune phase). options: any other `mixq train` option by its field name (lr,
    finetune_epochs, weight_bits, bit_lr, seed, budget="size=20", ...; see train.config.TrainConfig).

    The net is checked before anything trains: what freeze cannot take (an op, an activation
    it cannot quantize) is one FreezeError naming every such op and its module."""
    if not isinstance(model, nn.Module):
        raise APIError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4 or not len(example_input):
        raise APIError("example_input: a batch of training images, a float tensor N x C x H x W, is needed "
                       "(it sets the input shape and calibrates the quantizers)")
    fields = set(TrainConfig.__dataclass_fields__) - {"model", "dataset", "data_dir", "input_size", "num_classes",
                                                      "input_shape", "classes"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise APIError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    net = copy.deepcopy(model).cpu().float()
    x = example_input.detach().cpu().float()
    if num_classes is None:
        with torch.no_grad():
            try:
                out = net.eval()(x[:2])
            except RuntimeError as e:           # torch's shape errors
                raise APIError(f"model: does not take example_input of shape {tuple(x.shape)} "
                               f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None
        if out.ndim != 2:
            raise APIError(f"model: returns a tensor of shape {tuple(out.shape)} for example_input; class logits "
                           "N x classes are expected")
        num_classes = out.shape[1]
    cfg = TrainConfig(model=type(model).__name__, dataset="user", method=method, target_bits=target_bits,
                      act_bits=act_bits, epochs=epochs, num_classes=int(num_classes), input_shape=tuple(x.shape[1:]),
                      **options)
    try:
        cfg.validate_options()
    except ConfigError as e:
        raise APIError(str(e)) from None
    net = surgery.insert_signed_quantizers(surgery.one_module_per_activation(net), cfg.act_bits)
    m = cfg.method_class().from_config(cfg, net)
    qmodel = quant.QuantModel(m.prepare(net))
    freezable(qmodel, m, cfg)
    torch.manual_seed(cfg.seed)
    from mixq.train.loop import calibrate, set_budget
    calibrate(qmodel, x, cfg)
    try:
        set_budget(qmodel, m, cfg, x)
    except ConfigError as e:
        raise APIError(str(e)) from None
    if example_labels is not None:
        if len(example_labels) != len(x):
            raise APIError(f"example_labels: {len(example_labels)} labels for {len(x)} example images")
        m.attach_data(x, torch.as_tensor(example_labels).long().cpu())
    elif getattr(m, "calibration", False) is None:          # BSQ and CLADO measure losses on labelled images
        raise APIError(f"example_labels: method '{method}' needs the labels of example_input")
    return QModel(qmodel, m, cfg)


def fit(q: QModel, train_loader, test_loader, device: str | None = None, out=None) -> dict:
    """Train `q` for q.config.epochs with mixq's loop (train.loop.train_epoch: the method's
    hooks, its regularizer, mixq's optimizers and schedule) on your loaders of (images,
    labels) batches; each epoch's test accuracy of the hardened and the relaxed network is
    recorded (q.history). Returns the metrics `mixq train` writes to metrics.json (accuracy,
    relaxed_accuracy, int_accuracy, avg_bits, layers, ...); out: also write metrics.json,
    history.csv and the plots there. The model ends hardened, on the CPU, ready to freeze."""
    from mixq.train import loop
    if not isinstance(q, QModel):
        raise APIError(f"q: expected what mixq.api.prepare returns, got {type(q).__name__}")
    if test_loader is None or not len(train_loader) or not len(test_loader):
        raise APIError("train_loader and test_loader: each needs at least one batch")
    cfg, method = q.config, q.method
    proc = loop.Proc(device=loop.pick_device(device or cfg.device))
    q.model.to(proc.device)
    opts, scheds = q.optimizers(len(train_loader))
    history = []
    for epoch in range(cfg.epochs):
        q.model.train()
        method.harden(False)
        t0 = time.time()
        loss_sum, reg_sum = loop.train_epoch(q.model, method, train_loader, opts, scheds, cfg, epoch, proc=proc)
        history.append(loop.epoch_report(q.model, method, test_loader, proc.device, epoch, len(train_loader),
                                         loss_sum, reg_sum, time.time() - t0, opts["sgd"]))
    q.model.cpu()
    method.harden(True)
    spec = datasets.DataSpec("user data", cfg.num_classes, cfg.input_shape, train_loader.dataset, test_loader.dataset)
    metrics = loop.summarize(q.model, method, cfg, history, spec, integer_metrics)
    q.history, q.metrics = history, metrics
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        loop.write_reports(Path(out), metrics, history)
    return metrics


def freeze(q: QModel, out=None) -> G.IntGraph:
    """The integer program of the trained `q` (hardened first); out: also the frozen/ directory
    `mixq freeze` writes (manifest.json + arrays), which `mixq compile` and `inspect` read."""
    from mixq.freeze import freeze_model
    if not isinstance(q, QModel):
        raise APIError(f"q: expected what mixq.api.prepare returns, got {type(q).__name__}")
    if out is not None:
        G.check_overwritable(out)
    q.method.harden(True)
    cfg = q.config
    meta = {"method": cfg.method, "dataset": cfg.dataset, "act_bits": cfg.act_bits, "num_classes": cfg.num_classes,
            "training": training_facts({"metrics": q.metrics, "history": q.history}, cfg, q.method)}
    g = freeze_model(q.model, cfg.model, cfg.input_shape, meta)
    if out is not None:
        G.save(g, out)
    return g


def compile(graph, target: str = "host", out=None, strategy: str = "auto", log=print) -> Path:  # noqa: A001 - the stage's verb
    """Compile an IntGraph (or a frozen/ directory) with TVM for `target` ("host", "x86",
    "aarch64", ... as `mixq compile --target`) into the build directory `out`, which
    `deploy` and `mixq deploy` run. Returns `out`."""
    from mixq.compile.build import compile_frozen
    if out is None:
        raise APIError("out: the build directory to write is needed (the compiled library is a file)")
    if isinstance(graph, G.IntGraph):
        with tempfile.TemporaryDirectory() as tmp:
            G.save(graph, Path(tmp) / "frozen")
            compile_frozen(Path(tmp) / "frozen", target, out, strategy, log)
    else:
        compile_frozen(graph, target, out, strategy, log)
    return Path(out)


def deploy(build, test=None, board=None, repeat: int = 30, batch_size: int = 64, progress: bool = False,
           log=print) -> dict:
    """Run the build on a board (None: a local TVM RPC server; else "HOST:PORT" or a
    runtime.session.BoardSpec), check every output bit for bit against the golden interpreter,
    measure accuracy and latency: the report `mixq deploy` writes to BUILD/report.json.
    test: (images, labels), tensors or arrays, normalized as in training; None: the test split of
    the dataset the build was trained on (zoo runs)."""
    from mixq.runtime import deploy as D, session as S
    if isinstance(board, str):
        host, port = S.parse_address(board, "board")
        board = S.BoardSpec(host, port)
    return D.deploy(build, board, repeat=repeat, batch_size=batch_size, progress=progress, log=log, test=test)
