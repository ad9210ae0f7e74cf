"""x86 for the packed fast path: its instruction sets (compile/kernels.py's PackedISA), the
VNNI tensor intrinsic, and `isa_for(target)`, the choice from the target's CPU features.

x86-vnni  AVX512-VNNI `vpdpbusd`: u8 x s8 -> int32, 16 output x 4 input channels per
          instruction (TensorIR intrinsic `mixq_dot_16x4_vnni`). Activations are uint8 as they
          are; the signed network input is stored as x + 128.
          With AVX512-VBMI also `vpermb` for depthwise convs (`mixq_depthwise_4x16_vbmi`:
          4 pixels x 16 channels transposed to 16 lanes of 4 taps, then one vpdpbusd).
x86-avx2  the same loops without the intrinsic: LLVM vectorizes exact int32 multiply-adds
          (for CPUs without VNNI). `dot_16x4_avx512` (pmaddubsw) is never used: it
          saturates in int16, so it is not exact.
"""
from __future__ import annotations

import dataclasses

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from mixq.compile.kernels import PackedISA
from mixq.compile.registry import Unsupported

# Our own name: importing tvm.s_tir.tensor_intrin (for the wheel's name) loads every target's
# intrinsics, CUDA's included, which takes tens of seconds.
VNNI_INTRIN = "mixq_dot_16x4_vnni"
DEPTHWISE_INTRIN = "mixq_depthwise_4x16_vbmi"

VNNI = PackedISA("x86-vnni", VNNI_INTRIN, lanes=16, act_dtype="uint8", act_offset=0,
                  input_offsets=(("int8", 128), ("uint8", 0)), accumulators=16, vector_bits=512)
VNNI_VBMI = dataclasses.replace(VNNI, depthwise_intrin=DEPTHWISE_INTRIN)
AVX2 = PackedISA("x86-avx2", None, lanes=16, act_dtype="uint8", act_offset=0,
                  input_offsets=(("int8", 128), ("uint8", 0)), accumulators=8, vector_bits=256,
                  vector_registers=16)


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


# The wheel's `dot_16x4_vnni` passes <16 x i32> operands where LLVM 22's
# llvm.x86.avx512.vpdpbusd.512 takes <64 x i8>: this one reinterprets them.
@T.prim_func(s_tir=True)
def _vnni_16x4_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
        b_i8x64 = B.vload([0, 0], dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), a_u8x64, b_i8x64, dtype="int32x16")


TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _vnni_16x4_impl, override=True)


@T.prim_func(s_tir=True)
def _depthwise_4x16_desc(
    A: T.Buffer((4, 16), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk, vi], "int32") * T.cast(B[vi, vk], "int32")


# A is 4 pixels x 16 channels (64 contiguous bytes of the packed layout); vpermb moves byte
# 16 q + c to 4 c + q (the index vector is a constant LLVM folds), so that lane c holds the
# 4 taps of channel c, as vpdpbusd wants them against B's 16 lanes x 4 taps.
@T.prim_func(s_tir=True)
def _depthwise_4x16_impl(
    A: T.Buffer((4, 16), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
        T.writes(C[0:16])
        r = T.Ramp(T.int8(0), T.int8(1), 64)
        index = T.bitwise_or(T.shift_left(T.bitwise_and(r, T.Broadcast(T.int8(3), 64)), T.Broadcast(T.int8(4), 64)),
                             T.shift_right(r, T.Broadcast(T.int8(2), 64)))
        taps = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.qi.512"),
            T.reinterpret(A.vload([0, 0], dtype="uint8x64"), dtype="int8x64"), index, dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), T.reinterpret(taps, dtype="uint8x64"), B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16")


TensorIntrin.register(DEPTHWISE_INTRIN, _depthwise_4x16_desc, _depthwise_4x16_impl, override=True)


def _has(target, feature: str) -> bool:
    return target.kind.name == "llvm" and bool(codegen.target_has_features(feature, target))


def has_vnni(target) -> bool:
    return _has(target, "avx512vnni")


def isa_for(target) -> PackedISA:
    """The x86 instructions the target's features (mcpu / mattr) allow; Unsupported otherwise."""
    if has_vnni(target):
        return VNNI_VBMI if _has(target, "avx512vbmi") else VNNI
    if _has(target, "avx2"):
        return AVX2
    raise Unsupported(f"target {target.attrs.get('mcpu', '')} has neither AVX512-VNNI nor AVX2")

