"""`mixq deploy BUILD_DIR [--board HOST:PORT | --tracker HOST:PORT --key K] --dataset D`.

Without --board/--tracker a TVM RPC server is started on 127.0.0.1 (a free port) for the run
and stopped afterwards: the host check goes through the same RPC path as a real board."""
from __future__ import annotations

import sys

from mixq.runtime import deploy as D
from mixq.runtime import session as S


def add_arguments(p):
    p.add_argument("build_dir", help="build directory from mixq compile")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--board", metavar="HOST:PORT", help="a TVM RPC server (python -m tvm.exec.rpc_server)")
    where.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker; needs --key")
    p.add_argument("--key", help="the board key registered at the tracker")
    p.add_argument("--dataset", default=None, help="defaults to the dataset the model was trained on")
    p.add_argument("--data-dir", default=None, help="defaults to the training run's (recorded by freeze)")
    p.add_argument("--images", type=int, default=None, help="check the first N test images (default: all)")
    p.add_argument("--repeat", type=int, default=30, help="latency samples (time_evaluator repeats)")
    p.add_argument("--batch-size", type=int, default=64, help="images per call for the exactness check")
    p.add_argument("--metrics", default=None, help="the training run's metrics.json (default: what the "
                                                   "frozen model records of its training run)")
    p.add_argument("--no-progress", action="store_true")


def board_spec(args) -> S.BoardSpec | None:
    if args.key and not args.tracker:
        raise S.BoardError("--key needs --tracker HOST:PORT")
    if args.tracker:
        if not args.key:
            raise S.BoardError("--tracker needs --key K (the key the board registered with)")
        return S.BoardSpec(*S.parse_address(args.tracker, "--tracker"), key=args.key)
    if args.board:
        return S.BoardSpec(*S.parse_address(args.board, "--board"))
    return None


def run(args) -> int:
    report = D.deploy(args.build_dir, board_spec(args), args.dataset, args.data_dir, args.images,
                      args.repeat, args.batch_size, args.metrics, progress=not args.no_progress)
    if not report["bit_exact"]:
        print(f"mixq deploy: {args.build_dir}: the deployed program is NOT bit-exact "
              f"({report['mismatches']} of {report['images_checked']} images differ)", file=sys.stderr)
        return 1
    return 0
