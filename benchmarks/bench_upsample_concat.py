"""upsample_concat on the CPU with pytest-benchmark: fused op vs eager interpolate + cat.

    pytest benchmarks/bench_upsample_concat.py --benchmark-json=bench.json

Shapes are fusion layers of RANet C-1 at batch 64 (recorded from the model, see
benchmarks/upsample_concat.py, which also times torch.compile and the GPU).
"""

import pytest
import torch

from benchmarks.upsample_concat import eager_concat, fusion_shapes, fused_concat
from ranet_fast.env import environment_info

CASES = fusion_shapes("cifar-c1")[:4]
IMPLEMENTATIONS = {"fused": fused_concat, "eager": eager_concat}


@pytest.mark.parametrize("case", CASES, ids=lambda case: "+".join("x".join(map(str, s)) for s in case[0]))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_upsample_concat_cpu(benchmark, implementation, case):
    parts_shapes, size = case
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(64, *shape, generator=generator) for shape in parts_shapes]
    benchmark.group = f"upsample_concat {case} float32 cpu"
    benchmark.extra_info["environment"] = environment_info()
    out = benchmark(IMPLEMENTATIONS[implementation], parts, size)
    # A fast wrong answer is no result.
    torch.testing.assert_close(out, eager_concat(parts, size), rtol=1e-5, atol=1e-6)
