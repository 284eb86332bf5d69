"""exit_partition (confidence, prediction and the stable continue/leave split) on every backend vs its reference.

    python -m benchmarks exit_partition --criterion max_softmax --rows 64 1024 16384 --device cpu \
        --json exit_partition-cpu.json
    python -m benchmarks exit_partition --form scatter --rows 16 64 256 --device cpu

The threshold is the median confidence, so about half of the batch leaves and the partition does
real work. Each backend that runs on the device (``cuda``, ``triton``, ``cpu``) and the op's
pure-PyTorch ``reference``, timed side by side (benchmarks/common.py: run_logits_op).

``--form scatter`` times the scatter form ``exit_partition_scatter`` (the decision and the write of
the leaving rows into [2N, C] results in one call, what the early-exit engine runs per exit)
and, beside each backend, the same backend's two calls it replaces, ``exit_partition`` then
``scatter_exits`` (named "<backend> 2 ops").
"""

from __future__ import annotations

import torch

from ranet_fast.ops import exit_partition, exit_partition_reference, exit_partition_scatter, scatter_exits
from ranet_fast.ops.exit_partition import CRITERIA, stable_partition

from .common import run_logits_op

TWO_OPS = " 2 ops"


def op_case(logits: torch.Tensor, options):
    threshold = float(exit_partition_reference(logits, 0.0, options.criterion)[0].float().median())
    if options.form == "scatter":
        return scatter_case(logits, threshold, options.criterion)

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


def scatter_case(logits: torch.Tensor, threshold: float, criterion: str):
    """The scatter form, into results of 2N rows (the batch the live rows came from), per contender."""
    num_rows = logits.shape[0]
    positions = torch.randperm(2 * num_rows, generator=torch.Generator().manual_seed(1))[:num_rows].to(logits.device)
    results = {}

    def call(contender: str):
        if contender not in results:
            results[contender] = (logits.new_full((2 * num_rows, logits.shape[1]), float("nan")),
                                  torch.full((2 * num_rows,), -1, dtype=torch.int64, device=logits.device))
        result_logits, result_exit = results[contender]
        if contender.endswith(TWO_OPS):
            backend = contender.removesuffix(TWO_OPS)
            _, _, order, num_continue = exit_partition(logits, threshold, criterion, backend=backend)
            scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, 1, backend=backend)
        else:
            order, num_continue = exit_partition_scatter(logits, threshold, criterion, positions, 1, result_logits,
                                                         result_exit, backend=contender)
        return order, num_continue, result_logits, result_exit

    def check(got, expected) -> None:
        # At the median threshold a backend's float32 confidence may fall on the other side of it
        # than the reference's, so the leaving rows are checked against the backend's own split.
        order, num_continue, result_logits, result_exit = got
        leaving = order[int(num_continue):]
        written = positions[leaving]
        assert torch.equal(result_logits[written], logits[leaving]), "a leaving row was not copied exactly"
        assert (result_exit[written] == 1).all() and int((result_exit == 1).sum()) == leaving.numel()

    return call, check


def contenders(backends: list[str], options) -> list[str]:
    if options.form != "scatter":
        return backends
    return [name for backend in backends
            for name in ((backend,) if backend == "reference" else (backend, backend + TWO_OPS))]


def add_arguments(parser) -> None:
    parser.add_argument("--criterion", choices=list(CRITERIA), default="max_softmax")
    parser.add_argument("--form", choices=["partition", "scatter"], default="partition",
                        help="scatter: exit_partition_scatter against exit_partition + scatter_exits")


def main(argv=None) -> dict:
    return run_logits_op("exit_partition", __doc__, argv, "exit_partition", op_case, add_arguments, contenders)


if __name__ == "__main__":
    main()
