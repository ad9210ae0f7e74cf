"""`mixq train`: the train stage (mixq.train), plus the accuracy of the integer program.

The command sits above the stages: training (mixq.train) comes before freeze and imports
nothing of it, while `mixq train` reports, in metrics.json, how the trained model classifies
under the deployed integer semantics (`int_accuracy`, `int_agreement`; mixq.intsim freezes it
in memory and runs the integer graph in torch). It hands that measurement to the training loop
as its `evaluate` callback (train.loop.train says why a callback)."""
from __future__ import annotations

from mixq.train import cli


def integer_metrics(model, cfg, spec) -> dict:
    """`evaluate` for train.loop.train: the finished run's integer accuracy and agreement."""
    from mixq import intsim
    return intsim.integer_accuracy(model, cfg.model, cfg.input_shape, cfg.act_bits, spec.test, spec.workers)


def freezable(model, method, cfg):
    """`check` for train.loop.train: the untrained model, hardened, walked by freeze; every op
    freeze would refuse after training is named now, in one FreezeError (exit 2), before any
    epoch. Float activations (--act-bits 32) make a reference run that is never frozen."""
    from mixq import freeze
    if cfg.act_bits >= 32:
        return
    method.harden(True)
    try:
        problems = freeze.unsupported(model, cfg.model, cfg.input_shape)
    finally:
        method.harden(False)
    if problems:
        raise freeze.FreezeError(f"model '{cfg.model}' cannot become an integer program, nothing was trained; "
                                 f"{len(problems)} problem{'s' * (len(problems) > 1)}: " + "; ".join(problems))


def train(cfg, out_dir: str, resume: bool = False) -> dict:
    """train.loop.train with the integer metrics and the freeze check: what `mixq train` runs."""
    from mixq.train.loop import train as train_loop
    return train_loop(cfg, out_dir, resume, evaluate=integer_metrics, check=freezable)


add_arguments = cli.add_arguments


def run(args) -> int:
    return cli.run(args, evaluate=integer_metrics, check=freezable)
