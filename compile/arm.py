"""aarch64 for the packed fast path: its instruction sets (compile/kernels.py's PackedISA), the
sdot tensor intrinsic, and `isa_for(target)`, the choice from the target's CPU features.

arm-sdot  NEON `sdot` (ARMv8.2 dotprod: Cortex-A55/A75/A76, Raspberry Pi 5, Jetson Orin...):
          s8 x s8 -> int32, 4 output x 4 input channels per instruction (TensorIR
          intrinsic `mixq_dot_4x4_i8i8s32_sdot`, 4 of them per 16-channel block). The
          network's signed input is used as it is; uint8 activations are stored as a - 128
          so they fit s8 (the conv adds 128 * sum(w) back through its bias).
arm-neon  no dotprod (Cortex-A53/A72, Raspberry Pi 3/4): the same loops, LLVM vectorizes
          exact int32 multiply-adds.

Exactness can only be checked on a board: the emulated one (`make arm-board`, qemu) or a
real one over RPC (tests/test_kernels.py, slow).
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from mixq.compile.kernels import PackedISA
from mixq.compile.registry import Unsupported

# Our own registration: the wheel's `dot_4x4_i8i8s32_sdot` is the same, but importing it loads
# every target's intrinsics (tvm.s_tir.tensor_intrin), CUDA's included: tens of seconds.
SDOT_INTRIN = "mixq_dot_4x4_i8i8s32_sdot"

SDOT = PackedISA("arm-sdot", SDOT_INTRIN, lanes=4, act_dtype="int8", act_offset=-128,
                  input_offsets=(("int8", 0), ("uint8", -128)), accumulators=16)
NEON = PackedISA("arm-neon", None, lanes=16, act_dtype="uint8", act_offset=0,
                  input_offsets=(("int8", 128), ("uint8", 0)), accumulators=4)


@T.prim_func(s_tir=True)
def _sdot_4x4_desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _sdot_4x4_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        a_i8x16 = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"), a_i8x16, B.vload([0, 0], dtype="int8x16"), dtype="int32x4")


TensorIntrin.register(SDOT_INTRIN, _sdot_4x4_desc, _sdot_4x4_impl, override=True)


def is_aarch64(target) -> bool:
    return target.kind.name == "llvm" and str(target.attrs.get("mtriple", "")).startswith("aarch64")


def isa_for(target) -> PackedISA:
    """The aarch64 instructions the target's features (mattr) allow; Unsupported otherwise."""
    if not is_aarch64(target):
        raise Unsupported("not an aarch64 target")
    if codegen.target_has_features("dotprod", target):
        return SDOT
    if codegen.target_has_features("neon", target) or codegen.target_has_features("asimd", target):
        return NEON
    raise Unsupported("aarch64 target without NEON")

