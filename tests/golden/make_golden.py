"""Record golden reference data from the official RANet or MSDNet code.

Usage (from the repository root; the official code lives outside this repository):

    python -m tests.golden.make_golden --official-dir /tmp/official [--only NAME ...]
    python -m tests.golden.make_golden --arch MSDNet --official-dir /tmp/official-msdnet [--only NAME ...]

For RANet (the default) ``--official-dir`` must hold unmodified copies of yangle15/RANet-pytorch
``models/RANet.py`` (without its ``__main__`` block) and ``op_counter.py``; for MSDNet, of
kalviny/MSDNet-PyTorch ``models/msdnet.py`` and ``op_counter.py``. One ``<name>.pt`` per
configuration of that architecture (``common.CONFIGS`` or ``common.MSDNET_CONFIGS``) is written next
to this file; see README.md for the fields.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import tempfile
from types import ModuleType

import torch

from tests.golden.common import (ALL_CONFIGS, INIT_SEED, INITIAL_WEIGHTS_PATHS, INPUT_SEED, NOTES_MFLOPS,
                                 NOTES_MPARAMS, OFFICIAL, WEIGHT_SEED, Official, check_official_copy,
                                 deterministic_state_dict, golden_input, golden_path, image_size, make_args,
                                 recorded_sources, state_dict_fingerprint)


# Above this many bytes of BatchNorm statistics only the first and last few BN modules are kept.
RUNNING_STATS_BUDGET = 1_500_000
RUNNING_STATS_SUBSET = 3


def configs_of(arch: str) -> list[str]:
    return [name for name, config in ALL_CONFIGS.items() if config["arch"] == arch]


def load_official(official_dir: str, official: Official) -> tuple[ModuleType, ModuleType]:
    modules = []
    for module_name, (source_path, source) in zip(("official_model", "official_op_counter"), official.sources.items()):
        path = os.path.join(official_dir, os.path.basename(source_path))
        check_official_copy(path, official.repository, source_path, source)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def build_official(module: ModuleType, name: str, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    args = make_args(name)
    model_class = getattr(module, OFFICIAL[ALL_CONFIGS[name]["arch"]].model_class)
    with contextlib.redirect_stdout(io.StringIO()):  # the official MSDNet prints its layer plan
        model = model_class(args)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.float()


def running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    stats = {}
    bn_prefixes = []
    for key, value in model.state_dict().items():
        prefix, leaf = key.rsplit(".", 1)
        if leaf in ("running_mean", "running_var", "num_batches_tracked"):
            stats[key] = value.detach().clone()
            if prefix not in bn_prefixes:
                bn_prefixes.append(prefix)
    size = sum(v.numel() * v.element_size() for v in stats.values())
    if size <= RUNNING_STATS_BUDGET:
        return stats
    keep = set(bn_prefixes[:RUNNING_STATS_SUBSET] + bn_prefixes[-RUNNING_STATS_SUBSET:])
    return {k: v for k, v in stats.items() if k.rsplit(".", 1)[0] in keep}


def measure_flops(official: ModuleType, op_counter: ModuleType, name: str) -> tuple[list[float], list[int]]:
    # cls_ops / cls_params are module globals that measure_model appends to and never clears.
    op_counter.cls_ops = []
    op_counter.cls_params = []
    model = build_official(official, name, None)
    size = image_size(name)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per exit
        flops, params = op_counter.measure_model(model, size, size)
    return [float(f) for f in flops], [int(p) for p in params]


def check_logits(tag: str, logits: list[torch.Tensor]) -> None:
    stds = []
    for index, exit_logits in enumerate(logits):
        if not torch.isfinite(exit_logits).all():
            raise RuntimeError(f"{tag}: exit {index} logits are not finite")
        # Spread across classes within each sample: near zero would make the golden data useless.
        spread = exit_logits.std(dim=1).min().item()
        if spread < 1e-2:
            raise RuntimeError(f"{tag}: exit {index} logits are degenerate (min per-sample std {spread:.2e})")
        stds.append(exit_logits.std().item())
    print(f"  {tag} logits std per exit: " + " ".join(f"{s:.3f}" for s in stds))


def report_flops(name: str, flops: list[float], params: list[int], total_params: int) -> None:
    print(f"  MFLOPs per exit: " + " ".join(f"{f / 1e6:.2f}" for f in flops))
    if name in NOTES_MFLOPS:
        diffs = [(f / 1e6 - n) / n * 100 for f, n in zip(flops, NOTES_MFLOPS[name])]
        worst = max(abs(d) for d in diffs)
        print(f"  vs notes (%):    " + " ".join(f"{d:+.2f}" for d in diffs)
              + ("" if worst <= 0.5 else "   <-- differs by more than 0.5%"))
        if len(flops) != len(NOTES_MFLOPS[name]):
            print(f"  exit count {len(flops)} != notes {len(NOTES_MFLOPS[name])}")
    print(f"  MParams per exit: " + " ".join(f"{p / 1e6:.3f}" for p in params)
          + f"; whole model {total_params / 1e6:.3f}")
    if name in NOTES_MPARAMS:
        notes = NOTES_MPARAMS[name]
        print(f"  params vs notes {notes} M: last exit {(params[-1] / 1e6 - notes) / notes * 100:+.2f}%, "
              f"whole model {(total_params / 1e6 - notes) / notes * 100:+.2f}%")


def save_atomic(obj: dict, path: str) -> None:
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; the files are committed data
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def record(official: ModuleType, op_counter: ModuleType, name: str) -> dict:
    print(f"{name}:")
    template = build_official(official, name, None)
    official_state = template.state_dict()
    keys_and_shapes = [[key, list(value.shape)] for key, value in official_state.items()]
    state = deterministic_state_dict({k: tuple(s) for k, s in keys_and_shapes}, WEIGHT_SEED)
    x = golden_input(name, seed=INPUT_SEED)

    eval_model = build_official(official, name, state).eval()
    with torch.no_grad():
        eval_logits = [y.detach().clone().float() for y in eval_model(x)]
    num_exits = len(eval_logits)
    check_logits("eval", eval_logits)

    train_model = build_official(official, name, copy.deepcopy(state)).train()
    with torch.no_grad():
        train_logits = [y.detach().clone().float() for y in train_model(x)]
    check_logits("train", train_logits)
    stats = running_stats(train_model)

    flops, params = measure_flops(official, op_counter, name)
    if len(flops) != num_exits:
        raise RuntimeError(f"op_counter reported {len(flops)} exits, the model has {num_exits}")
    total_params = sum(p.numel() for p in template.parameters())
    report_flops(name, flops, params, total_params)

    arch = ALL_CONFIGS[name]["arch"]
    if arch == "RANet":  # the official RANet reports its exit count in args
        args = make_args(name)
        official.RANet(args)
        expected_exits = args.num_exits
    else:  # MSDNet: one exit per block
        expected_exits = ALL_CONFIGS[name]["nBlocks"]
    if expected_exits != num_exits:
        raise RuntimeError(f"the official configuration has {expected_exits} exits, the model gave {num_exits} logits")

    return {
        "config": copy.deepcopy(ALL_CONFIGS[name]),
        "num_exits": num_exits,
        "keys_and_shapes": keys_and_shapes,
        "weight_seed": WEIGHT_SEED,
        "weight_fingerprint": state_dict_fingerprint(state, [k for k, _ in keys_and_shapes]),
        "input_seed": INPUT_SEED,
        "input_shape": list(x.shape),
        "eval_logits": eval_logits,
        "train_logits": train_logits,
        "train_running_stats": stats,
        "flops": flops,
        "params": params,
        "total_params": total_params,
        **recorded_sources(arch),
        "torch_version": str(torch.__version__),
    }


def record_initial_weights(official: ModuleType, arch: str) -> dict[str, torch.Tensor]:
    """Fingerprints of the official models' own initialisation after ``torch.manual_seed(INIT_SEED)``
    (CIFAR configurations: the ImageNet ones only add time), so a test can show that building
    ours after the same seed gives the same weights."""
    fingerprints = {}
    for name in configs_of(arch):
        if ALL_CONFIGS[name]["data"] == "ImageNet":
            continue
        torch.manual_seed(INIT_SEED)
        state = build_official(official, name, None).state_dict()
        fingerprints[name] = state_dict_fingerprint(state, list(state))
    return fingerprints


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(OFFICIAL), default="RANet", help="whose official code (default: RANet)")
    parser.add_argument("--official-dir", required=True,
                        help="folder with the official model file (RANet.py or msdnet.py) and op_counter.py")
    parser.add_argument("--only", nargs="+", choices=sorted(ALL_CONFIGS), help="record only these configurations")
    options = parser.parse_args(argv)
    names = options.only or configs_of(options.arch)
    wrong = [name for name in names if ALL_CONFIGS[name]["arch"] != options.arch]
    if wrong:
        parser.error(f"--only {' '.join(wrong)}: not {options.arch} configurations")

    torch.set_num_threads(2)
    official, op_counter = load_official(options.official_dir, OFFICIAL[options.arch])
    for name in names:
        data = record(official, op_counter, name)
        save_atomic(data, golden_path(name))
        reloaded = torch.load(golden_path(name), weights_only=True)
        assert reloaded["num_exits"] == data["num_exits"]
        print(f"  wrote {golden_path(name)} ({os.path.getsize(golden_path(name)) / 1e3:.0f} kB)")
    initial_weights_path = INITIAL_WEIGHTS_PATHS[options.arch]
    save_atomic(record_initial_weights(official, options.arch), initial_weights_path)
    print(f"  wrote {initial_weights_path}")


if __name__ == "__main__":
    main()
