"""Compile a frozen model into a self-contained build directory.

    BUILD_DIR/model.so      the Relax executable (`export_library`; cross-compiled for other arches)
    BUILD_DIR/frozen/       a copy of the frozen model it came from (the golden reference)
    BUILD_DIR/deploy.json   what the runtime needs to trust and drive the library: the frozen
                            manifest's sha256, target and arch, input quantization, output,
                            entry function and batch, TVM version, compile seconds

The library exports one Relax function, `main(x) -> output`, with a symbolic batch dimension,
so one library runs batch 1 (latency) and large batches (bit-exact check, accuracy); `mixq
compile --batch B` fixes the batch of a program the fast path takes part in instead
(deploy.json "entry": {"batch": B}; the runtime then pads the last chunk).
The build directory is written atomically (temp dir beside it, renamed into place: fsio.atomic_dir).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

from mixq import fsio, graph as G
from mixq.errors import MixqError

BUILD_FORMAT = "mixq-build"
BUILD_FORMAT_VERSION = 1
LIBRARY = "model.so"
DEPLOY_JSON = "deploy.json"
FROZEN_COPY = "frozen"
ENTRY_FUNCTION = "main"

# --target presets; anything else must be a JSON target ({"kind": "llvm", ...})
AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
PRESETS = ("host", "aarch64")


class CompileError(MixqError, ValueError):
    """A user-facing compile failure: the message names the option or file at fault."""


# ----------------------------------------------------------------------------- targets
def normalize_arch(name: str) -> str:
    """Machine names as `uname -m` / an LLVM triple spell them -> one spelling per arch."""
    name = name.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64_be": "aarch64"}.get(name, name)


def host_arch() -> str:
    return normalize_arch(platform.machine())


def host_target_config() -> dict:
    """This machine: LLVM's name for its CPU (so it gets AVX-512/VNNI etc.) and its cores.
    A library built for it may use instructions other x86 CPUs lack: deploy it here."""
    from tvm.target import codegen
    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": os.cpu_count() or 1}


# LLVM features that are instruction sets (the rest of a CPU's feature list tunes code generation:
# prefer-256-bit, false-deps-..., fast-...): a library using one a CPU lacks dies there of SIGILL
_ISA_FEATURE = re.compile(r"^(avx|amx|sse|ssse|fma|f16c|bmi|popcnt|lzcnt|movbe|gfni|vaes|vpclmulqdq|sha|aes|adx|xop|tbm|"
                          r"pclmul|cx16|rdrnd|rdseed|prfchw|clflushopt|clwb|sm3|sm4)")


def missing_cpu_features(config: dict) -> list[str]:
    """Instruction sets a library built for `config` (its mcpu and +features) may use that this
    machine lacks; [] for a target of another arch or without a CPU (nothing to compare)."""
    import tvm
    from tvm.target import codegen
    if config.get("kind") != "llvm" or not config.get("mcpu") or \
            (config.get("mtriple") and normalize_arch(str(config["mtriple"]).split("-")[0]) != host_arch()):
        return []
    try:
        built = set(codegen.llvm_get_cpu_features(tvm.target.Target(config)))
        here = set(codegen.llvm_get_cpu_features(tvm.target.Target(host_target_config())))
    except Exception:  # noqa: BLE001 - an mcpu this LLVM does not know: nothing to compare
        return []
    return sorted(f for f in built - here if _ISA_FEATURE.match(f))


def target_config(spec: str) -> dict:
    """--target host | aarch64 | '<json>' -> a target config dict."""
    spec = spec.strip()
    if spec == "host":
        return host_target_config()
    if spec == "aarch64":
        return dict(AARCH64_TARGET)
    if spec.startswith("{"):
        try:
            config = json.loads(spec)
        except json.JSONDecodeError as e:
            raise CompileError(f"--target: not valid JSON ({e})") from None
        if not isinstance(config, dict) or "kind" not in config:
            raise CompileError('--target: a JSON target must be an object with a "kind", e.g. '
                               '{"kind": "llvm", "mcpu": "skylake-avx512"}')
        return config
    raise CompileError(f"--target '{spec}': unknown target (use host, aarch64, or a JSON target "
                       'such as \'{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\')')


def make_target(config: dict):
    import tvm
    if config.get("kind") != "llvm":
        raise CompileError(f"--target: kind '{config.get('kind')}' is not supported (mixq builds CPU "
                           "libraries: kind llvm)")
    try:
        return tvm.target.Target(config)
    except Exception as e:  # noqa: BLE001 - TVM raises plain ValueError/TVMError with long text
        raise CompileError(f"--target {json.dumps(config)}: {str(e).strip().splitlines()[0]}") from None


def target_arch(target) -> str:
    """The arch the library runs on: the target's mtriple, else this machine."""
    triple = target.attrs.get("mtriple")
    return normalize_arch(str(triple).split("-")[0]) if triple else host_arch()


def cross_compiler(target) -> str | None:
    """The C++ driver that links a library for another arch (None: this machine's default).

    Debian names both after the triple: g++-<triple> installs <triple>-g++."""
    if target_arch(target) == host_arch():
        return None
    triple = str(target.attrs["mtriple"])
    # Debian's cross toolchains use the canonical "<arch>-linux-gnu" triple
    compiler = f"{triple}-g++"
    if shutil.which(compiler) is None:
        raise CompileError(f"cross compiler {compiler} not found on PATH: install the Debian package "
                           f"g++-{triple} (apt-get install g++-{triple})")
    return compiler


# ----------------------------------------------------------------------------- build dir
def is_build_dir(path) -> bool:
    try:
        return json.loads((Path(path) / DEPLOY_JSON).read_text()).get("format") == BUILD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_overwritable(out_dir: Path):
    """Only an empty directory or an earlier build may be replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CompileError(f"--out {out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and not is_build_dir(out_dir):
        raise CompileError(f"--out {out_dir}: exists and is not a mixq build directory; refusing to "
                           "overwrite it")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- compile
def lower_module(graph: G.IntGraph, target, strategy: str = "auto", options: dict | None = None, log=print):
    """(IRModule, info) for `graph` on `target`: each op lowered by the first strategy that
    takes it (compile/lower.py: with "auto", the packed fast path where the target's CPU
    features and the op allow it, else the default lowering; "default": the default lowering
    only), the default kernels given the generic schedule (compile/schedule.py).

    `options` are the fast path's options of `mixq compile` (batch, tune_trials, tune_db,
    tune_board): batch None is a symbolic batch, an int fixes it; with tune_trials,
    MetaSchedule first tunes the packed conv kernels (at `batch`, or 1) into `tune_db`, on
    `tune_board` over RPC when given; records already in `tune_db` are used either way.
    info: {"strategy": the packed ISA's name (e.g. "x86-vnni") or "default", "batch": the
    fixed batch or None, "lowerings": {op: strategy}, ...}; what the fast path did is logged."""
    from mixq.compile import kernels, lower, schedule, tune

    o = {"batch": None, "tune_trials": 0, "tune_db": None, "tune_board": None, **(options or {})}
    batch, tune_db = o["batch"], o["tune_db"]
    if strategy == "auto" and lower.isa_for(target) is None:
        log("fast path: the target has no int8 dot-product strategy (x86 AVX512-VNNI/AVX2, aarch64 "
            "NEON); default lowering")
        strategy = "default"
    if strategy == "default":
        lowered = lower.lower_graph(graph, target, "default")
        return schedule.schedule_module(lowered.module, target), {"strategy": "default", "batch": None,
                                                                  "lowerings": lowered.chosen}
    preferred = lower.strategies_for(target, strategy)[0]
    tuned_batch = batch or 1
    info = {"strategy": None, "batch": batch}
    if o["tune_trials"]:
        if tune_db is None:
            raise tune.TuneError("--tune needs --tune-db DIR (where the tuning records go)")
        dry = lower.lower_graph(graph, target, strategy, batch=tuned_batch)
        tunable = {k: n * k.macs for k, n in dry.uses.items() if kernels.is_tunable(k)}
        if tunable:
            runner = tune.board_runner(o["tune_board"]) if o["tune_board"] else None
            t0 = time.time()
            tune.tune_kernels(tunable, target, o["tune_trials"], tune_db, runner=runner)
            info.update(tune_trials=o["tune_trials"], tune_seconds=round(time.time() - t0, 1))
    database = tune.open_database(tune_db) if tune_db else None
    lowered = lower.lower_graph(graph, target, strategy, batch=batch, database=database, tuned_batch=tuned_batch)
    if preferred not in lowered.chosen.values():
        # not one op took it: the program the default lowering alone gives (any batch)
        reason = next(iter(lowered.fallbacks.values()), "no op")
        log(f"fast path: not used ({reason}); default lowering" if preferred == "packed" else
            f"strategy {preferred}: not used ({reason}); default lowering")
        return lower_module(graph, target, "default", log=log)
    name = lowered.isa.name if preferred == "packed" else preferred
    if preferred == "packed":
        declined = "; ".join(lowered.fallbacks.values())
        log(f"fast path: used ({name}) for {_coverage(graph, lowered.chosen)}"
            + (f"; default lowering for {declined}" if declined else ""))
    info.update(strategy=name, kernels=len(lowered.kernels), tuned_for_batch=tuned_batch if database else None,
                tuned_kernels=sum(1 for h in lowered.schedules.values() if h == "tuned"),
                tune_db=str(tune_db) if tune_db else None, lowerings=lowered.chosen)
    if lowered.fallbacks:
        info["fallbacks"] = lowered.fallbacks
    return schedule.schedule_module(lowered.module, target), info


def _coverage(graph: G.IntGraph, chosen: dict) -> str:
    """'N of M ops' on the fast path, and how many of them are depthwise and grouped convs."""
    fast = [op for op in graph.ops if chosen.get(op.name) == "packed"]
    grouped = [op for op in fast if op.kind == "conv2d" and op.attrs.get("groups", 1) > 1]
    depthwise = sum(1 for op in grouped if op.arrays["weight"].shape[:2] == (op.attrs["groups"], 1))
    kinds = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((depthwise, "depthwise conv"),
                                                                 (len(grouped) - depthwise, "grouped conv")) if n]
    return f"{len(fast)} of {len(graph.ops)} ops" + (f" ({', '.join(kinds)})" if kinds else "")


def build_library(graph: G.IntGraph, target, strategy: str = "auto", options: dict | None = None, log=print):
    """(Relax executable, info) for `graph` on `target` (see lower_module)."""
    import tvm

    from mixq.compile.schedule import relax_pipeline

    mod, info = lower_module(graph, target, strategy, options, log)
    # "default_build": legalize and lower, no operator fusion; every kernel already carries
    # its own epilogue and its schedule. relax_pipeline() adds a workaround for a TVM codegen
    # slowdown of every kernel when the batch is symbolic (see compile/schedule.py)
    with target:
        ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline())
    return ex, info


def export(ex, path: Path, compiler: str | None):
    import tvm.support.cc
    if compiler is None:
        ex.export_library(str(path))
    else:
        ex.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(compiler))


def compile_frozen(frozen_dir, target_spec: str, out_dir, strategy: str = "auto", log=print,
                   options: dict | None = None) -> dict:
    """Compile FROZEN_DIR for --target into BUILD_DIR; returns the deploy.json record."""
    import tvm

    frozen_dir, out_dir = Path(frozen_dir), Path(out_dir)
    config = target_config(target_spec)
    target = make_target(config)
    compiler = cross_compiler(target)            # fail before the work, not after it
    check_overwritable(out_dir)
    graph = G.load(frozen_dir)
    manifest_hash = G.manifest_sha256(frozen_dir)

    t0 = time.time()
    ex, info = build_library(graph, target, strategy, options, log)
    with fsio.atomic_dir(out_dir, CompileError) as tmp:
        export(ex, tmp / LIBRARY, compiler)
        seconds = time.time() - t0
        shutil.copytree(frozen_dir, tmp / FROZEN_COPY)
        if G.manifest_sha256(tmp / FROZEN_COPY) != manifest_hash:
            raise CompileError(f"{frozen_dir}: changed while it was being compiled")
        out_t = graph.tensors[graph.output]
        record = {
            "format": BUILD_FORMAT, "format_version": BUILD_FORMAT_VERSION,
            "model": graph.model,
            "dataset": graph.meta.get("dataset"),
            "frozen_manifest_sha256": manifest_hash,
            "frozen": FROZEN_COPY,
            # where the frozen model was compiled from: its run dir may hold metrics.json
            "source_frozen_dir": str(frozen_dir.resolve()),
            "library": LIBRARY,
            "library_bytes": (tmp / LIBRARY).stat().st_size,
            "library_sha256": sha256_file(tmp / LIBRARY),
            "target": config,
            "target_str": str(target),
            "arch": target_arch(target),
            "cross_compiler": compiler,
            "entry": {"function": ENTRY_FUNCTION, "batch": info.get("batch") or "dynamic"},
            "input": {"name": graph.input.name, "dtype": graph.input.dtype, "bits": graph.input.bits,
                      "scale": graph.input.scale, "shape": list(graph.input.shape)},
            "output": {"name": graph.output, "dtype": out_t.dtype, "shape": list(out_t.shape)},
            "strategy": info.get("strategy"),
            "lowering_info": {k: v for k, v in info.items() if k not in ("strategy", "batch")},
            "tvm_version": tvm.__version__,
            "compile_seconds": round(seconds, 3),
        }
        (tmp / DEPLOY_JSON).write_text(json.dumps(record, indent=1) + "\n")
    log(f"compiled {graph.model} for {record['arch']} ({config.get('mcpu') or config.get('mtriple') or 'llvm'}) "
        f"in {seconds:.1f} s: {out_dir / LIBRARY} ({record['library_bytes'] / 1024:.0f} KiB)")
    return record
