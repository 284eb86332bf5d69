"""gather_rows on the CPU with pytest-benchmark: one call vs a per-tensor index_select loop.

    pytest benchmarks/bench_gather_rows.py --benchmark-json=bench.json

Tensors: the first layer's features and every block output of RANet C-1 at
batch 64 plus the positions vector, half of the samples kept (see
benchmarks/gather_rows.py, which also times the GPU and a plain copy).
"""

import pytest
import torch

from benchmarks.gather_rows import index_select_loop, live_shapes
from ranet_fast.env import environment_info
from ranet_fast.ops import gather_rows

BATCH = 64


def compacted(tensors, index):
    return gather_rows(tensors, index, check_index=False)


IMPLEMENTATIONS = {"gather_rows": compacted, "loop": index_select_loop}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn((BATCH, *shape), generator=generator) for shape in live_shapes("cifar-c1")]
    tensors.append(torch.arange(BATCH))
    return tensors, torch.randperm(BATCH, generator=generator)[: BATCH // 2]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_gather_rows_cpu(benchmark, inputs, implementation):
    tensors, index = inputs
    benchmark.group = f"gather_rows cifar-c1 live tensors, batch {BATCH}, float32 cpu"
    benchmark.extra_info["environment"] = environment_info()
    outputs = benchmark(IMPLEMENTATIONS[implementation], tensors, index)
    # A fast wrong answer is no result.
    for got, want in zip(outputs, index_select_loop(tensors, index)):
        assert torch.equal(got, want)
