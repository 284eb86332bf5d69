"""exit_confidence (max softmax probability and argmax of exit logits) on every backend vs its reference.

    python -m benchmarks exit_confidence --rows 64 1024 16384 --classes 10 100 1000 --device cpu \
        --json exit_confidence-cpu.json

Each backend that runs on the device (``cuda``, ``triton``, ``cpu``) and the op's pure-PyTorch
``reference``, timed side by side (benchmarks/common.py: run_logits_op).
"""

from __future__ import annotations

import torch

from ranet_fast.ops import exit_confidence

from .common import run_logits_op


def op_case(logits: torch.Tensor, options):
    def call(backend: str):
        return exit_confidence(logits, backend=backend)

    def check(got, expected) -> None:
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1]), "a backend's predictions differ from the reference's"

    return call, check


def main(argv=None) -> dict:
    return run_logits_op("exit_confidence", __doc__, argv, "exit_confidence", op_case)


if __name__ == "__main__":
    main()
