"""exit_confidence on the CPU: compiled extension vs the PyTorch reference.

    pytest benchmarks/bench_exit_confidence.py --benchmark-json=bench.json

Shapes are exit-head logits of typical batches: CIFAR-10, CIFAR-100 and ImageNet.
"""

import pytest
import torch

from ranet_fast import _extension
from ranet_fast.env import environment_info
from ranet_fast.ops import exit_confidence, exit_confidence_reference

SHAPES = [(1024, 10), (1024, 100), (256, 1000)]

IMPLEMENTATIONS = {
    "cpu-extension": lambda logits: exit_confidence(logits, backend="cpu"),
    "reference": exit_confidence_reference,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_exit_confidence_cpu(benchmark, implementation, shape):
    if implementation == "cpu-extension" and not _extension.extension_loaded():
        pytest.skip(f"ranet_fast._C not loaded: {_extension.extension_import_error()}")
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"exit_confidence {shape[0]}x{shape[1]} float32 cpu"
    benchmark.extra_info["environment"] = environment_info()
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    confidence, prediction = benchmark(IMPLEMENTATIONS[implementation], logits)
    # A fast wrong answer is no result.
    expected_confidence, expected_prediction = exit_confidence_reference(logits.double())
    torch.testing.assert_close(confidence.double(), expected_confidence, rtol=1e-5, atol=1e-7)
    assert torch.equal(prediction, expected_prediction)
