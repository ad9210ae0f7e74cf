"""`mixq compile FROZEN_DIR --target host|aarch64|<json> --out BUILD_DIR`."""
from __future__ import annotations

from mixq.compile import build


def add_arguments(p):
    p.add_argument("frozen_dir", help="frozen model directory (mixq freeze)")
    p.add_argument("--target", default="host",
                   help="host (this CPU), aarch64 (cross-compiled, Debian g++-aarch64-linux-gnu), or a "
                        'JSON TVM target such as \'{"kind": "llvm", "mcpu": "skylake-avx512"}\'')
    p.add_argument("--out", required=True, help="build directory to write (model.so, deploy.json, frozen/)")
    p.add_argument("--strategy", choices=("auto", "default"), default="auto",
                   help="auto: a registered whole-graph fast path when one takes the graph, else the "
                        "per-op default lowering; default: always the per-op default lowering")


def run(args) -> int:
    build.compile_frozen(args.frozen_dir, args.target, args.out, args.strategy)
    return 0
