"""exit_partition on the CPU: compiled extension vs the PyTorch reference.

    pytest benchmarks/bench_exit_partition.py --benchmark-json=bench.json

N is the still-running batch at an exit, C the classes of CIFAR-10, CIFAR-100
and ImageNet heads. The threshold sends about half of the batch out, so the
partition does real work.
"""

import pytest
import torch

from ranet_fast import _extension
from ranet_fast.env import environment_info
from ranet_fast.ops import exit_partition, exit_partition_reference
from ranet_fast.ops.exit_partition import stable_partition

BATCHES = [64, 1024, 16384]
CLASSES = [10, 100, 1000]
CRITERION = "max_softmax"

IMPLEMENTATIONS = {
    "cpu-extension": lambda logits, threshold: exit_partition(logits, threshold, CRITERION, backend="cpu"),
    "reference": lambda logits, threshold: exit_partition_reference(logits, threshold, CRITERION),
}


@pytest.mark.parametrize("num_classes", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("num_rows", BATCHES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_exit_partition_cpu(benchmark, implementation, num_rows, num_classes):
    if implementation == "cpu-extension" and not _extension.extension_loaded():
        pytest.skip(f"ranet_fast._C not loaded: {_extension.extension_import_error()}")
    # Scaled so that the confidences spread over (0, 1) for every C.
    logits = torch.randn(num_rows, num_classes, generator=torch.Generator().manual_seed(0)) * 4
    threshold = float(exit_partition_reference(logits, 0.0, CRITERION)[0].median())
    benchmark.group = f"exit_partition {CRITERION} {num_rows}x{num_classes} float32 cpu"
    benchmark.extra_info["environment"] = environment_info()
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    confidence, prediction, order, num_continue = benchmark(IMPLEMENTATIONS[implementation], logits, threshold)
    # A fast wrong answer is no result. The decisions are checked against the
    # op's own confidences: at the median threshold, a confidence one float32
    # ulp away from the reference's may fall on the other side.
    expected = exit_partition_reference(logits, threshold, CRITERION)
    torch.testing.assert_close(confidence, expected[0], rtol=1e-5, atol=1e-7)
    assert torch.equal(prediction, expected[1])
    expected_order, expected_num_continue = stable_partition(confidence >= threshold)
    assert torch.equal(order, expected_order) and torch.equal(num_continue, expected_num_continue)
