"""The index width of kernels compiled in a 32-bit and a 64-bit variant (INDEX_DTYPE).

32-bit division and modulo are several times cheaper on the GPU than 64-bit ones, and the index
arithmetic is most of what these kernels compute, so launchers take 64-bit indices only when an
element index or memory offset could reach 2**31. That needs tensors of 2**31 elements, too big
for a test on the CPU, so RANET_FAST_TRITON_INT64_INDEX=1 makes every launcher take the 64-bit
variant whatever the sizes: a switch for tests, read at every launch.
"""

import os

import triton.language as tl

FORCE_INT64_ENV = "RANET_FAST_TRITON_INT64_INDEX"


def index_type(largest: int):
    """tl.int32 when every index and offset of a launch is below ``largest`` < 2**31, else tl.int64."""
    if largest >= 2**31 or os.environ.get(FORCE_INT64_ENV) == "1":
        return tl.int64
    return tl.int32
