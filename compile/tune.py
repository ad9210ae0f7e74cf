"""MetaSchedule tuning of mixq's fast kernels (`mixq compile --tune N --tune-db DIR`).

The search space of a kernel is its hand schedule with the tile sizes left as MetaSchedule
decisions (`kernel.schedule(sch, tiles="sample")`), so every candidate keeps the packed layout
and the dot-product tensorization, and so stays bit-exact. Records go to a JSON database in
DIR (`database_workload.json`, `database_tuning_record.json`); a later compile of the same
kernel shapes for the same target finds them there (`open_database`) and tunes nothing again.
Kernels are keyed by their unscheduled PrimFunc, so identical layers share one task.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from mixq.compile.kernels import prim_func
from mixq.errors import MixqError


class TuneError(MixqError, RuntimeError):
    pass


def _is_aarch64(target) -> bool:
    return str(target.attrs.get("mtriple", "")).startswith("aarch64")


def _lazy_tensor_intrin_package():
    """TuneContext runs `import tvm.s_tir.tensor_intrin`, whose __init__ registers every
    target's intrinsics; CUDA's alone take ~30 s to parse. mixq's design spaces use only the
    intrinsics mixq registers itself, so the package is entered without its __init__: its
    submodules (tvm.s_tir.tensor_intrin.x86, ...) still import normally on demand."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name, "tvm.s_tir.tensor_intrin without its eager imports (mixq)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    package.__spec__ = spec
    sys.modules[name] = package


def open_database(db_dir) -> ms.database.JSONDatabase | None:
    """The tuning database in `db_dir`, or None when there is none yet."""
    db_dir = Path(db_dir)
    if not (db_dir / "database_tuning_record.json").is_file():
        return None
    return ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """tqdm bar over all trials, with the best time so far per task."""

    def __init__(self, bar, names):
        super().__init__()
        self.bar, self.names, self.best = bar, names, {}

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        for r in runner_results:
            if r.run_secs:
                us = sum(float(s) for s in r.run_secs) / len(r.run_secs) * 1e6
                self.best[task_id] = min(self.best.get(task_id, float("inf")), us)
        self.bar.update(len(runner_results))
        self.bar.set_postfix_str(f"{self.names[task_id]} best {self.best.get(task_id, float('nan')):.1f} us")


def _build(mod, target, _params):
    """MetaSchedule's default build minus its `import tvm.s_tir.tensor_intrin`, which loads
    every target's intrinsics (tens of seconds in each fresh builder process). Candidates are
    already tensorized, so the worker needs no intrinsic."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_aarch64(mod) -> str:
    """Candidates for an aarch64 board: a shared library linked by the cross compiler (the
    default export is a tar of objects, which a runtime-only board cannot link)."""
    import tempfile

    import tvm.support.cc
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


def _direct_session(rpc_config):
    """A session with a board's own RPC server (no tracker): host and port travel in the
    config's tracker fields."""
    from tvm import rpc
    return rpc.connect(rpc_config.tracker_host, int(rpc_config.tracker_port),
                       session_timeout=rpc_config.session_timeout_sec)


def _alloc_from_host(session, device, args_info, alloc_repeat):
    """Kernel arguments filled from the host: a runtime-only board (the emulated one, a
    `pip install apache-tvm` board) has no tvm.contrib.random for MetaSchedule's default."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common
    rng = np.random.default_rng(0)

    def fill(arg):
        lo, hi = (1, 31) if str(arg.dtype) == "int32" else (0, 64)   # int32 args include shifts
        arg.copyfrom(rng.integers(lo, hi, tuple(arg.shape)).astype(str(arg.dtype)))
    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def board_runner(address: str, timeout_s: int = 300):
    """MetaSchedule runner that measures candidates on a board: "HOST:PORT" is the board's
    RPC server (e.g. the emulated board, 127.0.0.1:9091), "HOST:PORT:KEY" a board of that
    key registered with the RPC tracker at HOST:PORT."""
    parts = address.rsplit(":", 2) if address.count(":") >= 2 else address.rsplit(":", 1)
    try:
        host, port = parts[0], int(parts[1])
    except (IndexError, ValueError):
        raise TuneError(f"--tune-board {address}: expected HOST:PORT or HOST:PORT:KEY") from None
    key = parts[2] if len(parts) == 3 else "direct"
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=timeout_s)
    return ms.runner.RPCRunner(config, evaluator_config=ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=50),
                               f_create_session=_direct_session if len(parts) == 2 else None,
                               f_alloc_argument=_alloc_from_host)


def _record_hand_schedules(kernels, target, database, builder, runner):
    """Measure each kernel's hand schedule and store it as a tuning record, so that the
    database's best record is never a sampled schedule slower than the default one (with few
    trials per kernel, random tiles often are)."""
    schedules = []
    for kernel in kernels:
        sch = Schedule(tvm.IRModule({"main": prim_func(kernel)}))
        kernel.schedule(sch)
        schedules.append(sch)
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch in schedules])
    for kernel, sch, b in zip(kernels, schedules, built):
        if b.error_msg:
            continue
        args_info = ms.arg_info.ArgInfo.from_prim_func(prim_func(kernel))
        (future,) = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args_info)])
        result = future.result()
        shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
        if result.error_msg or not result.run_secs:
            continue
        workload = database.commit_workload(tvm.IRModule({"main": prim_func(kernel)}))
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [float(t) for t in result.run_secs], target, args_info))


def _task_loggers(log_dir: Path, names: list[str]) -> list[logging.Logger]:
    """One logger per tuning task writing to log_dir/NAME.log (what meta_schedule's
    get_loggers_from_work_dir gives, without its logging.config.dictConfig: that call
    reconfigures the whole process (it disables the caller's existing loggers) and fails
    the second time in a process whose meta_schedule logger carries an unnamed handler,
    as under pytest's log capture)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    loggers = []
    for name in names:
        logger = logging.getLogger(f"mixq.tune.{name}")
        for handler in list(logger.handlers):           # a logger of an earlier tuning run
            logger.removeHandler(handler)
            handler.close()
        handler = logging.FileHandler(log_dir / f"{name}.log", mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        loggers.append(logger)
    return loggers


def tune_kernels(kernels: dict, target, trials: int, db_dir, runner=None, progress=True,
                 seed: int = 0) -> ms.database.JSONDatabase:
    """Tune `kernels` ({kernel: weight}) for `trials` measurements in total.

    Kernels are compile/kernels.py kernels: `tensors()` (the workload) and
    `design_space(sch)` (sketches with sampled decisions). `runner` is a MetaSchedule runner
    (default: local; pass an RPCRunner to measure on a board). MetaSchedule's own logs go to
    DIR/logs."""
    from tqdm import tqdm

    if trials < 1:
        raise TuneError(f"--tune {trials}: the number of trials must be >= 1")
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    todo = [(k, w) for k, w in kernels.items()
            if not database.has_workload(tvm.IRModule({"main": prim_func(k)}))]
    names = [f"{type(k).__name__}{i}" for i, (k, _) in enumerate(todo)]
    if not todo:
        return database
    _lazy_tensor_intrin_package()
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=32, init_measured_ratio=0.2, init_min_unmeasured=8, max_fail_count=8,
        genetic_num_iters=2, genetic_mutate_prob=0.85, genetic_max_fail_count=4, eps_greedy=0.1)
    tasks = []
    loggers = _task_loggers(db_dir / "logs", names)
    for (kernel, _), name, rand, logger in zip(todo, names, ms.utils.fork_seed(seed, n=len(todo)), loggers):
        space = ms.space_generator.ScheduleFn(kernel.design_space,
                                              sch_rules=[], postprocs=[], mutator_probs={
                                                  ms.mutator.MutateTileSize(): 1.0})
        tasks.append(ms.TuneContext(mod=tvm.IRModule({"main": prim_func(kernel)}), target=target,
                                    space_generator=space, search_strategy=strategy,
                                    task_name=name, rand_state=rand,
                                    logger=logger).clone())
    builder = ms.builder.LocalBuilder(max_workers=os.cpu_count(), f_build=_build,
                                      f_export=_export_aarch64 if _is_aarch64(target) else None,
                                      timeout_sec=120)
    runner = runner or ms.runner.LocalRunner(
        evaluator_config=ms.runner.EvaluatorConfig(number=20, repeat=3, min_repeat_ms=20))
    _record_hand_schedules([k for k, _ in todo], target, database, builder, runner)
    per_iter = max(1, min(16, trials // len(tasks)))
    bar = tqdm(total=trials, desc=f"tuning {len(tasks)} kernels", unit="trial", disable=not progress)
    try:
        ms.tune_tasks(tasks=tasks, task_weights=[float(w) for _, w in todo], work_dir=str(db_dir),
                      max_trials_global=trials, num_trials_per_iter=per_iter,
                      builder=builder, runner=runner, database=database,
                      measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [_Progress(bar, names)],
                      cost_model="xgb", task_scheduler="gradient")
    finally:
        bar.close()
    return database
