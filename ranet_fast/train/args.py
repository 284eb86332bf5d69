"""Command line of ``ranet-train``.

Every flag of the official RANet ``args.py`` keeps its name, default, choices and meaning, so the
official README commands run unchanged; ``--data`` also accepts ``synthetic``. The extra flags
(``--download``, ``--amp``, ``--channels-last``, ``--device``, ``--fast``, ``--synthetic-size``,
``--num-classes``, ``--max-steps-per-epoch``) only add behaviour.

``--arch MSDNet`` (or the official ``msdnet``) builds kalviny/MSDNet-PyTorch's MSDNet and adds its
flags (``--base``, ``--prune``, ``--bottleneck``, ``--stepmode lin_grow``); the flags both official
scripts have (``--nBlocks``, ``--nChannels``, ``--grFactor``, ``--bnFactor``, ``--step``,
``--stepmode``) then take MSDNet's official defaults.

After parsing, the namespace is post-processed like the official one: the factor flags become
lists of int, ``nScales``, ``splits`` and ``num_classes`` are filled in, and the architecture is
checked (``ranet_fast.models.validate_model_args``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NoReturn, Sequence

from ranet_fast.models.msdnet_configs import MSDNET_DEFAULTS

DATA_CHOICES = ["cifar10", "cifar100", "ImageNet", "synthetic"]
ARCH_CHOICES = ["RANet", "MSDNet", "msdnet"]  # 'msdnet': the official MSDNet README's spelling
# The official MSDNet args.py defaults of the architecture flags it shares with RANet's.
MSDNET_SHARED_DEFAULTS = {flag: MSDNET_DEFAULTS[flag]
                          for flag in ("nBlocks", "nChannels", "grFactor", "bnFactor", "step", "stepmode")}


def _bool_word(text: str) -> bool:
    # The official --bottleneck has type=bool, which makes any non-empty word, 'False' included,
    # True; the word is read for what it says instead.
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return words[text.lower()]


def _synthetic_size(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected three positive integers TRAIN,VAL,TEST such as 64,32,32, got {text!r}")
    return sizes  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


class _StoreGpu(argparse.Action):
    """Store --gpu and remember that it was given: torchrun launches apply only an explicit one,
    because the official default '0' would put every process on the same GPU."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.gpu_given = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranet-train",
        description="RANet image classification: train, resume, and evaluate (anytime and "
                    "budgeted-batch dynamic inference). Flags follow the official RANet-pytorch args.py.")

    exp = parser.add_argument_group("exp", "experiment setting")
    exp.add_argument("--save", default=f"save/default-{time.time()}", type=str, metavar="SAVE",
                     help="path to the experiment logging directory (default: save/default-<time>)")
    exp.add_argument("--resume", action="store_true", default=None,
                     help="continue from the latest checkpoint in <save>/save_models (latest.txt)")
    exp.add_argument("--evalmode", default=None, choices=["anytime", "dynamic", "both"],
                     help="evaluate the checkpoint given by --evaluate-from instead of training")
    exp.add_argument("--evaluate-from", default="", type=str, metavar="PATH",
                     help="checkpoint to evaluate with --evalmode (official checkpoints load too)")
    exp.add_argument("--print-freq", "-p", default=10, type=int, metavar="N",
                     help="print every N batches when the output is not a terminal (default: 10)")
    exp.add_argument("--seed", default=0, type=int, help="random seed (default: 0)")
    exp.add_argument("--gpu", default="0", type=str, action=_StoreGpu,
                     help="GPUs made visible through CUDA_VISIBLE_DEVICES (default: '0'); under "
                          "torchrun only an explicit --gpu is applied")

    data = parser.add_argument_group("data", "dataset setting")
    data.add_argument("--data", metavar="D", default="cifar10", choices=DATA_CHOICES,
                      help="data to work on: " + ", ".join(DATA_CHOICES) + " (default: cifar10)")
    data.add_argument("--data-root", metavar="DIR", default="/data/cx/data",
                      help="path to dataset (default: /data/cx/data)")
    data.add_argument("--use-valid", action="store_true", default=False,
                      help="carve a validation split out of the training set (official semantics)")
    data.add_argument("-j", "--workers", default=4, type=int, metavar="N",
                      help="number of data loading workers (default: 4)")
    data.add_argument("--download", action="store_true", default=False,
                      help="download CIFAR into --data-root when it is missing")
    data.add_argument("--synthetic-size", type=_synthetic_size, default=None, metavar="TRAIN,VAL,TEST",
                      help="sizes of the synthetic data set's splits (default: ranet_fast.data's)")
    data.add_argument("--num-classes", type=_positive_int, default=None, metavar="N",
                      help="override the number of classes implied by --data")

    arch = parser.add_argument_group("arch", "model architecture setting")
    arch.add_argument("--arch", type=str, default="RANet", choices=ARCH_CHOICES)
    arch.add_argument("--reduction", default=0.5, type=float, metavar="C",
                      help="compression ratio of the transition layers (1 means no compression) "
                           "(default: 0.5)")
    arch.add_argument("--nBlocks", type=int, default=2)
    arch.add_argument("--nChannels", type=int, default=16)
    arch.add_argument("--growthRate", type=int, default=6)
    arch.add_argument("--grFactor", default="4-2-1", type=str)
    arch.add_argument("--bnFactor", default="4-2-1", type=str)
    arch.add_argument("--block-step", type=int, default=2)
    arch.add_argument("--scale-list", default="1-2-3", type=str)
    arch.add_argument("--compress-factor", default=0.25, type=float)
    arch.add_argument("--step", type=int, default=4)
    arch.add_argument("--stepmode", type=str, default="even", choices=["even", "lg", "lin_grow"],
                      help="RANet: even or lg (default: even); MSDNet: even or lin_grow (default: none, "
                           "which grows like lin_grow)")
    # Official flag: store_true with default True, i.e. always on; kept for command compatibility.
    arch.add_argument("--bnAfter", action="store_true", default=True)
    # MSDNet only (official MSDNet args.py).
    arch.add_argument("--base", type=int, default=4, help="MSDNet: layers of the first block (default: 4)")
    arch.add_argument("--prune", default="max", choices=["min", "max"],
                      help="MSDNet: where the finest scales are dropped (default: max)")
    arch.add_argument("--bottleneck", default=True, type=_bool_word,
                      help="MSDNet: 1x1 bottleneck convolutions, True or False (default: True)")

    optim = parser.add_argument_group("optimization", "optimization setting")
    optim.add_argument("--epochs", default=300, type=int, metavar="N",
                       help="number of total epochs to run (default: 300)")
    optim.add_argument("--start-epoch", default=0, type=int, metavar="N",
                       help="manual epoch number (useful on restarts)")
    optim.add_argument("-b", "--batch-size", default=64, type=int, metavar="N",
                       help="mini-batch size, over all processes together (default: 64)")
    optim.add_argument("--optimizer", default="sgd", choices=["sgd", "rmsprop", "adam"], metavar="N",
                       help="optimizer: sgd, rmsprop or adam (default: sgd)")
    optim.add_argument("--lr", "--learning-rate", default=0.1, type=float, metavar="LR",
                       help="initial learning rate (default: 0.1)")
    optim.add_argument("--lr-type", default="multistep", type=str, metavar="T",
                       choices=["cosine", "multistep"],
                       help="learning rate strategy: multistep or cosine (default: multistep)")
    optim.add_argument("--decay-rate", default=0.1, type=float, metavar="N",
                       help="decay rate of the multistep learning rate (default: 0.1)")
    optim.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum (default: 0.9)")
    optim.add_argument("--weight-decay", "--wd", default=1e-4, type=float, metavar="W",
                       help="weight decay (default: 1e-4)")

    run = parser.add_argument_group("runtime", "speed and debugging (not in the official code)")
    run.add_argument("--device", default=None,
                     help="torch device (default: cuda if available, else cpu); under torchrun each "
                          "process uses cuda:LOCAL_RANK")
    run.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                     help="mixed precision with torch.autocast; fp16 on CUDA also uses a GradScaler "
                          "(default: none)")
    run.add_argument("--channels-last", action="store_true", default=False,
                     help="use the channels_last memory format for the model and its inputs")
    run.add_argument("--cuda-graph", action="store_true", default=False,
                     help="capture each training step (forward, backward, optimizer step) in a CUDA graph and "
                          "replay it; CUDA only, with --optimizer sgd and --lr-type multistep, not with --amp "
                          "fp16 or torchrun (default: off)")
    run.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                     help="swap in ranet_fast's fused layers when they are available (default: --fast)")
    run.add_argument("--early-exit-images", type=_non_negative_int, default=1000, metavar="N",
                     help="dynamic evaluation also runs real early exit at every budget on the first N "
                          "test images and reports its throughput (0: skip; default: 1000)")
    run.add_argument("--max-steps-per-epoch", type=_positive_int, default=None, metavar="N",
                     help="stop every training epoch after N batches (smoke tests and demos; the "
                          "learning-rate schedule then treats N as the epoch length; default: none)")
    parser.set_defaults(gpu_given=False)
    return parser


class ArgumentError(ValueError):
    """A flag combination the trainer refuses; main() reports it like argparse (exit status 2)."""


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Official post-processing plus the trainer's consistency checks; raises ArgumentError."""
    from ranet_fast.data import num_classes_for
    from ranet_fast.models import finish_model_args, validate_model_args

    if args.arch == "msdnet":
        args.arch = "MSDNet"
    args.splits = ["train", "val", "test"] if args.use_valid else ["train", "val"]
    try:  # the official rule (cifar10 10, cifar100 100, ImageNet 1000), checking --num-classes
        args.num_classes = num_classes_for(args)
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    try:  # factor lists parsed into ints and nScales, as the official args.py does
        finish_model_args(args)
    except ValueError as error:
        raise ArgumentError(f"--grFactor/--bnFactor/--scale-list: {error}") from None

    try:
        validate_model_args(args)
    except ValueError as error:
        raise ArgumentError(" ".join(str(error).split())) from None

    problems = []
    if args.evalmode is not None and not args.evaluate_from:
        problems.append("--evalmode needs --evaluate-from PATH (the checkpoint to evaluate)")
    for flag, value, low in (("--epochs", args.epochs, 1), ("-b/--batch-size", args.batch_size, 1),
                             ("--print-freq", args.print_freq, 1), ("--workers", args.workers, 0),
                             ("--start-epoch", args.start_epoch, 0)):
        if value < low:
            problems.append(f"{flag} must be >= {low}, got {value}")
    if args.lr <= 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if problems:
        raise ArgumentError("; ".join(problems))
    return args


def report_argument_error(message: str) -> NoReturn:
    """Print a one-line argparse-style error and exit with status 2."""
    print(f"ranet-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and post-process the command line; bad flags exit with status 2 and a one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.arch in ("MSDNet", "msdnet"):
        parser.set_defaults(**MSDNET_SHARED_DEFAULTS)
        args = parser.parse_args(argv)
    try:
        return finish_args(args)
    except ArgumentError as error:
        report_argument_error(str(error))
