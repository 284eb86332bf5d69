"""scatter_exits (each leaving sample's logits and exit index written back to batch order) on every backend.

    python -m benchmarks scatter_exits --rows 64 1024 16384 --classes 10 100 1000 --device cpu \
        --json scatter_exits-cpu.json

The live batch of N samples sits at random positions of a result batch of 2N (what early exit
holds after earlier exits compacted it); the partition is exit_partition's at the median
confidence, so about half of the samples leave. Each backend that runs on the device (``cuda``,
``triton``, ``cpu``) and the op's pure-PyTorch ``reference``, timed side by side
(benchmarks/common.py: run_logits_op); every backend writes into result tensors of its own.
"""

from __future__ import annotations

import torch

from ranet_fast.ops import exit_partition_reference, scatter_exits

from .common import run_logits_op

EXIT_INDEX = 1


def op_case(logits: torch.Tensor, options):
    num_rows, num_classes = logits.shape
    confidence = exit_partition_reference(logits, 0.0)[0]
    _, _, order, num_continue = exit_partition_reference(logits, float(confidence.median()))
    generator = torch.Generator().manual_seed(1)
    positions = torch.randperm(2 * num_rows, generator=generator)[:num_rows].to(logits.device)
    results = {}

    def call(backend: str):
        if backend not in results:
            results[backend] = (logits.new_zeros(2 * num_rows, num_classes),
                                torch.full((2 * num_rows,), -1, dtype=torch.int64, device=logits.device))
        result_logits, result_exit = results[backend]
        scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, EXIT_INDEX,
                      backend=backend)
        return result_logits, result_exit

    def check(got, expected) -> None:
        # Copies of the same rows: every backend's results are the reference's, bit for bit.
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (
            "a backend's scattered results differ from the reference's")

    return call, check


def main(argv=None) -> dict:
    return run_logits_op("scatter_exits", __doc__, argv, "scatter_exits", op_case)


if __name__ == "__main__":
    main()
