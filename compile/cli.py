"""`mixq compile FROZEN_DIR --target host|aarch64|<json> --out BUILD_DIR`."""
from __future__ import annotations

from mixq import fsio
from mixq.compile import build


def add_arguments(p):
    p.add_argument("frozen_dir", help="frozen model directory (mixq freeze)")
    p.add_argument("--target", default="host",
                   help="host (this CPU), aarch64 (cross-compiled, Debian g++-aarch64-linux-gnu), or a "
                        'JSON TVM target such as \'{"kind": "llvm", "mcpu": "skylake-avx512"}\'')
    p.add_argument("--out", required=True, help="build directory to write (model.so, deploy.json, frozen/)")
    p.add_argument("--strategy", choices=("auto", "default"), default="auto",
                   help="auto: per op, the packed fast path where the target's CPU features and the op "
                        "allow it, else the default lowering; default: always the default lowering")
    fast = p.add_argument_group("fast path (x86 AVX512-VNNI/AVX2, aarch64 NEON sdot; compile/packed.py)")
    fast.add_argument("--batch", type=int, default=None,
                      help="compile the fast-path program for this batch only (default: any batch; a "
                           "fixed batch saves a little shape checking; tuning uses it, or 1)")
    fast.add_argument("--tune", type=int, default=0, metavar="N",
                      help="MetaSchedule trials for the fast path's conv kernels before compiling (0: hand "
                           "schedules, plus any records already in --tune-db)")
    fast.add_argument("--tune-db", default=None, metavar="DIR",
                      help="tuning database: --tune writes it, later compiles of the same kernel shapes "
                           "and target reuse it")
    fast.add_argument("--tune-board", default=None, metavar="HOST:PORT[:KEY]",
                      help="measure tuning candidates on a board: its RPC server (HOST:PORT), or a board "
                           "of KEY at the RPC tracker HOST:PORT (default: this machine)")


def run(args) -> int:
    if args.batch is not None and args.batch < 1:
        raise build.CompileError(f"--batch {args.batch}: must be >= 1")
    if args.tune < 0:
        raise build.CompileError(f"--tune {args.tune}: must be >= 0")
    if args.tune and not args.tune_db:
        raise build.CompileError("--tune needs --tune-db DIR (where the tuning records are kept)")
    if args.tune_board and not args.tune:
        raise build.CompileError("--tune-board only applies with --tune N")
    options = {"batch": args.batch, "tune_trials": args.tune, "tune_db": args.tune_db,
               "tune_board": args.tune_board}
    with fsio.DirLock(args.out, build.CompileError):
        build.compile_frozen(args.frozen_dir, args.target, args.out, args.strategy, options=options)
    return 0
