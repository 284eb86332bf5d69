"""The benchmarks' one command line: ``python -m benchmarks NAME [options]``.

Installed, the package is ``ranet_fast.benchmarks`` and the same command is ``ranet-bench NAME``
(or ``python -m ranet_fast.benchmarks NAME``). ``NAME --help`` describes a benchmark and its
options; benchmarks/README.md says what each measures and where its results go.
"""

from __future__ import annotations

import importlib
import sys

# Name -> what it measures. Each name is a module of this package with main(argv).
BENCHMARKS = {
    # One op against the computation it replaces, on RANet's own shapes.
    "fused_conv2d": "fused conv -> BN -> ReLU vs eager and torch.compile, every RANet conv shape, eval and train",
    "batch_norm_relu": "train-mode BatchNorm + ReLU ops vs eager and torch.compile, every RANet BN shape",
    "upsample_concat": "fused upsample + concat vs F.interpolate + torch.cat, every RANet fusion shape",
    "gather_rows": "one gather of the tensors alive at an exit vs an index_select loop and a plain copy",
    "exit_confidence": "confidence and prediction of exit logits vs the PyTorch reference",
    "exit_partition": "confidence, decision and stable partition at an exit vs the PyTorch reference",
    "scatter_exits": "scattering each exit's predictions back to batch order vs the PyTorch reference",
    "op_backends": "every op on every backend that runs here vs eager, with roofline floors",
    "dispatch": "measured dispatch per RANet layer: the path and op backends chosen, speed vs eager (eval, train)",
    # The model as a whole.
    "suite": "throughput suite: eager, converted, optimize and torch.compile on RANets (anytime, early exit, train)",
    "early_exit": "real early exit: realised vs FLOPs-predicted speed-up per budget",
    "convert": "ranet_fast.convert on torchvision and timm CNNs vs eager (and torch.compile)",
    "roofline": "FLOPs and bytes floors of RANet layers on a given device (no timing)",
    # The GPU check, and the tables published from the results files.
    "gpu_check": "the GPU check: tests, benchmarks and sanitizer stages under one deadline",
    "figures": "render the tables of README.md and docs/ from benchmarks/results/ (--check: compare only)",
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    return "usage: python -m benchmarks NAME [options]   (NAME --help for its options)\n\n" + "\n".join(
        f"  {name:<{width}}  {description}" for name, description in BENCHMARKS.items())


def main(argv=None) -> int:
    """Runs the named benchmark; returns the exit status (ranet-bench passes it to sys.exit)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # Relative to this package, so that it works as benchmarks (a checkout) and ranet_fast.benchmarks.
    result = importlib.import_module(f".{name}", __package__).main(rest)
    # A benchmark's main returns its result record (printed as it runs); the tools an exit status.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
