"""What each kernel module can launch on a GPU, for compiling it ahead of time without one.

Every kernel module has a ``specializations()`` function listing each distinct compiled variant
its launcher can ask for on CUDA tensors: the element type of every pointer argument, the value of
every ``tl.constexpr`` parameter (tile sizes, flags, accumulation and index types), the number of
warps, and whether the integer scalars are 32 or 64 bit. The lists are computed with the same
helper functions the launchers call (tile choices, flag and type rules), so they follow the code.
tests/test_triton_sm90_compile.py compiles them for sm_90 (``triton.compile`` with a GPUTarget)
and checks the machine code for register spills and tensor-core instructions.

Triton also specialises integer arguments on their value at launch: an argument equal to 1 becomes
a compile-time constant, and one divisible by 16 is marked so. ``ones`` names the integer
arguments a variant takes as the constant 1 (sizes and strides of 1 do occur: a batch of one,
a contiguous row); divisibility marks are left to the pointers, which torch allocates 16-byte
aligned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import triton

# Triton's element type name of each torch dtype a kernel reads or writes.
TRITON_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}

FLOATING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel that a CUDA launch can produce."""

    kernel: Any  # the @triton.jit function
    constexprs: Mapping[str, Any]  # every tl.constexpr parameter
    pointers: Mapping[str, torch.dtype]  # element type of every pointer parameter
    floats: tuple = ()  # float scalar parameters (a Python float reaches Triton as fp32)
    wide: bool = False  # integer scalars as i64: Triton passes a value of 2**31 or more so
    narrow: tuple = ()  # integer parameters that stay i32 when wide (counts that cannot reach 2**31)
    ones: tuple = ()  # integer parameters specialised to the constant 1
    num_warps: int = 4  # what the launch passes (Triton's default is 4)
    max_registers: int | None = None  # the launch's maxnreg, if it passes one
    tf32: bool = False  # its float32 dots are asked for in TF32 (else IEEE float32)
    # Which choice of ones this is, when ones also holds arguments implied by the constexprs (the
    # test's covering pairs this with the other dimensions instead of the tuple itself).
    ones_case: str | None = None

    def signature(self) -> dict[str, str]:
        """Triton's signature of the variant: 'constexpr', '*<type>' or a scalar type per parameter."""
        signature = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs or name in self.ones:
                signature[name] = "constexpr"
            elif name in self.pointers:
                signature[name] = "*" + TRITON_TYPES[self.pointers[name]]
            elif name in self.floats:
                signature[name] = "fp32"
            else:
                signature[name] = "i64" if self.wide and name not in self.narrow else "i32"
        return signature

    def attributes(self) -> dict[tuple[int], list]:
        """Triton's marks of the pointer parameters: 16-byte aligned, as torch allocates."""
        return {(index,): [["tt.divisibility", 16]] for index, name in enumerate(self.kernel.arg_names)
                if name in self.pointers}

    def options(self) -> dict[str, int]:
        """The compile options a launch passes: num_warps, and maxnreg where it caps registers."""
        return {"num_warps": self.num_warps, **({"maxnreg": self.max_registers} if self.max_registers else {})}

    def constants(self) -> dict[str, Any]:
        return {**self.constexprs, **{name: 1 for name in self.ones}}

    def label(self) -> str:
        """A short readable name: kernel, pointer types, constexprs, integer width, ones."""
        types = ",".join(sorted({TRITON_TYPES[dtype] for dtype in self.pointers.values()}))
        constants = ",".join(f"{name}={_show(value)}" for name, value in self.constexprs.items())
        ones = f" ones={','.join(self.ones)}" if self.ones else ""
        cap = f" maxnreg={self.max_registers}" if self.max_registers else ""
        return (f"{self.kernel.fn.__name__}[{types}] {constants} {'i64' if self.wide else 'i32'} "
                f"warps={self.num_warps}{cap}{ones}")


def _show(value: Any) -> str:
    return str(value).removeprefix("triton.language.")


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= limit: the inputs that reach every value of a
    tile rule built from triton.next_power_of_2 and min/max clamps at or below limit."""
    return [2**exponent for exponent in range(triton.next_power_of_2(limit).bit_length())]
