"""Run a build directory on a board and prove it: bit-exactness, accuracy, latency.

`deploy()` verifies BUILD_DIR (deploy.json, the library's and the frozen manifest's hashes),
connects to the board (or a local RPC server it starts), refuses a library built for another
architecture, quantizes the test split exactly as the golden interpreter does
(`graph.quantize_input`), runs the library in batches, compares every output integer with
`graph.run_batched` on the frozen copy, measures latency at batch 1 with `time_evaluator`
on the board, and writes BUILD_DIR/report.json, with what the training run measured as the
frozen copy's manifest records it (meta.training): deploy reads nothing but BUILD_DIR (and
--metrics when given).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mixq import data as datasets
from mixq import fsio, graph as G
from mixq.errors import MixqError
from mixq.compile import build as B
from mixq.runtime import session as S


class DeployError(MixqError, ValueError):
    """A bad build directory, dataset or option (one-line message naming it)."""


# ----------------------------------------------------------------------------- build dir
def load_build(build_dir) -> tuple[dict, G.IntGraph]:
    """deploy.json and the golden graph, after checking that the library and the frozen copy are
    the ones deploy.json was written for."""
    build_dir = Path(build_dir)
    path = build_dir / B.DEPLOY_JSON
    if not path.is_file():
        raise DeployError(f"{path}: no such file (not a build directory from mixq compile)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DeployError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != B.BUILD_FORMAT:
        raise DeployError(f"{path}: not a mixq build manifest")
    if record.get("format_version") != B.BUILD_FORMAT_VERSION:
        raise DeployError(f"{path}: build format version {record.get('format_version')} is not supported")
    lib = build_dir / record.get("library", B.LIBRARY)
    if not lib.is_file():
        raise DeployError(f"{lib}: missing (the compiled library)")
    if B.sha256_file(lib) != record.get("library_sha256"):
        raise DeployError(f"{lib}: sha256 does not match {path} (replaced or modified after compile)")
    frozen = build_dir / record.get("frozen", B.FROZEN_COPY)
    if not (frozen / "manifest.json").is_file():
        raise DeployError(f"{frozen}/manifest.json: missing (the frozen model this build came from)")
    if G.manifest_sha256(frozen) != record.get("frozen_manifest_sha256"):
        raise DeployError(f"{frozen}/manifest.json: sha256 does not match frozen_manifest_sha256 in "
                          f"{path} (the build and its frozen model disagree)")
    return record, G.load(frozen)


def training_facts(record: dict, build_dir: Path, graph: G.IntGraph, metrics_path=None) -> tuple[dict | None, str | None]:
    """(what training measured, where it came from): the frozen model's own record of its
    training run (manifest meta "training", written by freeze), or a metrics.json given with
    --metrics (e.g. for a frozen model from before freeze kept that record). None when neither
    has it: the report then says n/a."""
    if metrics_path:
        path = Path(metrics_path)
        if not path.is_file():
            raise DeployError(f"--metrics {metrics_path}: no such file")
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            m = None
        if not isinstance(m, dict) or m.get("model") != record.get("model"):
            raise DeployError(f"--metrics {metrics_path}: not the metrics.json of a {record.get('model')} run")
        return m, str(path)
    facts = graph.meta.get("training")
    manifest = Path(build_dir) / record.get("frozen", B.FROZEN_COPY) / "manifest.json"
    return (facts, str(manifest)) if isinstance(facts, dict) else (None, None)


# ----------------------------------------------------------------------------- running
def _batches(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def fixed_batch(record: dict) -> int | None:
    """The library's batch when it was compiled for one (else it takes any batch)."""
    batch = record["entry"].get("batch")
    return batch if isinstance(batch, int) else None


def pad_batch(x: np.ndarray, batch: int | None) -> np.ndarray:
    """`x` padded with zero images to `batch` rows (a fixed-batch library needs full batches)."""
    if batch is None or len(x) == batch:
        return x
    return np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), dtype=x.dtype)])


def run_deployed(model: S.RemoteModel, xq: np.ndarray, batch_size: int, fixed: int | None = None,
                 progress=True) -> np.ndarray:
    from tqdm import tqdm
    outs = []
    for lo, hi in tqdm(_batches(len(xq), fixed or batch_size), desc="deployed", unit="batch",
                       disable=not progress, leave=False):
        out = model.run(pad_batch(xq[lo:hi], fixed), what=f"images {lo}..{hi - 1}")
        outs.append(out[:hi - lo])
    return np.concatenate(outs)


def run_golden(graph: G.IntGraph, xq: np.ndarray, batch_size: int, progress=True) -> np.ndarray:
    from tqdm import tqdm
    return np.concatenate([G.run(graph, xq[lo:hi]) for lo, hi in
                           tqdm(_batches(len(xq), batch_size), desc="golden", unit="batch",
                                disable=not progress, leave=False)])


def _percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def check_arch(record: dict, model: S.RemoteModel, build_dir: Path):
    want = record.get("arch")
    if model.arch is not None and want != model.arch:
        hint = "aarch64" if model.arch == "aarch64" else ("host" if model.arch == B.host_arch() else
                                                           "a JSON target for it")
        raise S.BoardError(f"{build_dir / record['library']} is built for {want} but board "
                           f"{model.board.description} is {model.arch}: recompile with --target {hint}")
    if want == B.host_arch() and S.is_local_host(model.board.host):
        check_cpu(record, build_dir)


def check_cpu(record: dict, build_dir: Path):
    """A library for this arch run on this machine: refuse one built for a CPU with instruction
    sets this one lacks (`--target host` on another machine), which would die of SIGILL."""
    missing = B.missing_cpu_features(record.get("target") or {})
    if missing:
        mcpu = (record.get("target") or {}).get("mcpu")
        raise DeployError(f"{build_dir / record['library']} is built for CPU '{mcpu}', whose instructions "
                          f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} this machine's CPU "
                          f"({B.host_target_config()['mcpu']}) lacks: recompile here with --target host")


def load_test_split(record: dict, meta: dict, dataset: str | None, data_dir, images: int | None):
    """The test split, or N images spread evenly over it (a prefix may hold one class only):
    by default of the data the model was trained on, from the frozen manifest's meta
    (datasets.model_test_split: a folder at the model's input size, its recorded data_dir)."""
    if images is not None and images < 1:
        raise DeployError(f"--images {images}: must be >= 1")
    name = dataset or record.get("dataset") or meta.get("dataset") or "digits"
    spec = datasets.model_test_split(meta, record["input"]["shape"], record["output"]["shape"], name, data_dir,
                                     images, where=f"--dataset {name}")
    x, y = datasets.test_arrays(spec)
    return name, x, y


def user_test_split(record: dict, test) -> tuple[str, np.ndarray, np.ndarray]:
    """("user data", x, y) from test = (images, labels) handed in by the Python API: float NCHW
    images as the model saw them in training (normalized), integer labels."""
    try:
        x, y = (t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t) for t in test)
    except (TypeError, ValueError):
        raise DeployError("test data: expected (images, labels)") from None
    shape = tuple(record["input"]["shape"])
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or len(y) != len(x) or not len(x):
        raise DeployError(f"test data: images of shape {tuple(x.shape)} and {len(y)} labels do not fit the "
                          f"model's input {shape} (N images, N labels)")
    return "user data", x.astype(np.float32), y.astype(np.int64)


def deploy(build_dir, board: S.BoardSpec | None = None, dataset: str | None = None, data_dir=None,
           images: int | None = None, repeat: int = 30, batch_size: int = 64, metrics_path=None,
           progress: bool = True, log=print, test=None) -> dict:
    """Verify, run and measure BUILD_DIR on `board` (None: a local RPC server). Returns the report.
    test=(images, labels): those instead of a dataset's test split (the Python API)."""
    build_dir = Path(build_dir)
    if repeat < 1:
        raise DeployError(f"--repeat {repeat}: must be >= 1")
    if batch_size < 1:
        raise DeployError(f"--batch-size {batch_size}: must be >= 1")
    record, graph = load_build(build_dir)
    name, x, y = user_test_split(record, test) if test is not None else \
        load_test_split(record, graph.meta, dataset, data_dir, images)
    metrics, metrics_file = training_facts(record, build_dir, graph, metrics_path)
    xq = G.quantize_input(graph.input, x)

    t0 = time.time()
    if board is None:
        with S.local_server() as server:
            spec = S.BoardSpec(server.host, server.port)
            report = _run_on_board(record, build_dir, spec, xq, y, graph, repeat, batch_size, progress)
            report["board"] = f"local RPC server {server.address}"
    else:
        report = _run_on_board(record, build_dir, board, xq, y, graph, repeat, batch_size, progress)
        report["board"] = board.description
    report.update({
        "model": record["model"], "dataset": name,
        "trained_accuracy": None if metrics is None else metrics.get("accuracy"),
        "trained_int_accuracy": None if metrics is None else metrics.get("int_accuracy"),
        "trained_test_images": None if metrics is None else metrics.get("test_images"),
        "trained_method": None if metrics is None else metrics.get("method"),
        "trained_target_bits": None if metrics is None else metrics.get("target_bits"),
        "trained_avg_bits": None if metrics is None else metrics.get("avg_bits"),
        "metrics_file": metrics_file,
        "target": record["target"], "arch": record["arch"],
        "artifact_bytes": (build_dir / record["library"]).stat().st_size,
        "frozen_manifest_sha256": record["frozen_manifest_sha256"],
        "tvm_version": record.get("tvm_version"),
        "seconds": round(time.time() - t0, 2),
    })
    write_report(build_dir / "report.json", report)
    log(summary(report, build_dir))
    return report


def _run_on_board(record, build_dir, board, xq, y, graph, repeat, batch_size, progress) -> dict:
    model = S.RemoteModel(board, build_dir / record["library"], record["entry"]["function"])
    model.open()
    try:
        check_arch(record, model, build_dir)
        model.load()
        fixed = fixed_batch(record)
        got = run_deployed(model, xq, batch_size, fixed, progress)
        lat = model.latency_ms(pad_batch(xq[:1], fixed), repeat)
    finally:
        model.close()
    want = run_golden(graph, xq, 256, progress)
    if got.shape != want.shape or got.dtype != want.dtype:
        raise S.BoardError(f"board returned {got.dtype}{list(got.shape)}, the golden interpreter "
                           f"{want.dtype}{list(want.shape)}")
    differs = np.any(got.reshape(len(got), -1) != want.reshape(len(want), -1), axis=1)
    mismatches = int(differs.sum())
    return {
        "bit_exact": mismatches == 0 and len(got) > 0,
        "images_checked": int(len(got)),
        "mismatches": mismatches,
        "first_mismatch": int(np.argmax(differs)) if mismatches else None,
        "accuracy": 100.0 * float((got.argmax(1) == y).mean()),
        "reference_accuracy": 100.0 * float((want.argmax(1) == y).mean()),
        "accuracy_images": int(len(y)),
        "latency_ms": {"median": round(_percentile(lat, 50), 4), "p90": round(_percentile(lat, 90), 4),
                       "batch": fixed or 1, "samples": len(lat)},
        "board_arch": model.arch,
        # a board of another arch on this very machine can only be an emulator (qemu)
        "emulated": bool(model.arch and model.arch != B.host_arch() and S.is_local_host(board.host)),
    }


def write_report(path: Path, report: dict):
    fsio.write_text(path, json.dumps(report, indent=1) + "\n", DeployError)


def summary(r: dict, build_dir: Path) -> str:
    yes = "yes" if r["bit_exact"] else f"NO ({r['mismatches']} of {r['images_checked']} images differ)"
    trained = "n/a (the frozen model has no record of its training; pass --metrics)" if r["trained_accuracy"] is None else \
        f"{r['trained_accuracy']:.2f}%"
    lat = r["latency_ms"]
    emu = "  [emulated: qemu speed, not the board's]" if r["emulated"] else ""
    return "\n".join([
        f"{r['model']} on {r['dataset']} | {r['arch']} | board: {r['board']}",
        f"  bit-exact vs golden interpreter: {yes} ({r['images_checked']} images)",
        f"  accuracy: deployed {r['accuracy']:.2f}%, golden {r['reference_accuracy']:.2f}%, trained {trained}",
        f"  latency (batch {lat['batch']}): median {lat['median']:.3f} ms, p90 {lat['p90']:.3f} ms{emu}",
        f"  artifact: {r['artifact_bytes'] / 1024:.0f} KiB | report: {build_dir / 'report.json'}",
    ])
