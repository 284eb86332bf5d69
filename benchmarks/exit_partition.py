"""exit_partition (confidence, prediction and the stable continue/leave split) on every backend vs its reference.

    python -m benchmarks exit_partition --criterion max_softmax --rows 64 1024 16384 --device cpu \
        --json exit_partition-cpu.json

The threshold is the median confidence, so about half of the batch leaves and the partition does
real work. Each backend that runs on the device (``cuda``, ``triton``, ``cpu``) and the op's
pure-PyTorch ``reference``, timed side by side (benchmarks/common.py: run_logits_op).
"""

from __future__ import annotations

import torch

from ranet_fast.ops import exit_partition, exit_partition_reference
from ranet_fast.ops.exit_partition import CRITERIA, stable_partition

from .common import run_logits_op


def op_case(logits: torch.Tensor, options):
    threshold = float(exit_partition_reference(logits, 0.0, options.criterion)[0].float().median())

    def call(backend: str):
        return exit_partition(logits, threshold, options.criterion, backend=backend)

    def check(got, expected) -> None:
        confidence, prediction, order, num_continue = got
        torch.testing.assert_close(confidence, expected[0])
        assert torch.equal(prediction, expected[1]), "a backend's predictions differ from the reference's"
        # The split is checked against the backend's own confidences: at the median threshold, a
        # confidence one ulp away from the reference's may fall on the other side.
        expected_order, expected_num_continue = stable_partition(confidence >= threshold)
        assert torch.equal(order, expected_order) and torch.equal(num_continue, expected_num_continue)

    return call, check


def add_arguments(parser) -> None:
    parser.add_argument("--criterion", choices=list(CRITERIA), default="max_softmax")


def main(argv=None) -> dict:
    return run_logits_op("exit_partition", __doc__, argv, "exit_partition", op_case, add_arguments)


if __name__ == "__main__":
    main()
