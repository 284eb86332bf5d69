"""Measured dispatch per layer: the path and backends each fast layer chose, and its speed against eager.

    python -m benchmarks dispatch --configs cifar-c1 cifar-c3 --batch 64 \\
        --json benchmarks/results/dispatch-cpu-c1-c3.json

For each RANet configuration, the model is converted (``ranet_fast.convert``) and every fast layer's
inputs are recorded in one forward (forward pre-hooks on the fast modules, all layers taking their
original forward so that every fast module runs, nested ones included): in eval mode under
``torch.no_grad`` (workload ``eval-forward``), and in train mode with gradients (``train-step``: the
layer's forward, then the backward of its outputs with ones as their gradients; the inputs that
required grad in the model require it here). Layers of the same class, structure and inputs
(the dispatch key) are timed once; ``count`` says how many there were.

Per layer, with an empty dispatch cache (``--cache-dir``, a fresh temporary directory by default)
and tuning on: one call lets the dispatch measure and choose (``path``: fused or eager; ``ops``: the
backend each op of the chosen path took, with how many calls), then ``interleaved_samples`` times the
layer as dispatched (``auto``, all of its cost, the dispatch's lookups included) against the same
layer forced to its original forward (``eager``: ``ranet_fast.dispatch.layer_path("eager")``, which
every nested fast layer obeys too, so it is the official computation). ``seconds`` are medians over
the rounds; ``ratio`` is the median over rounds of that round's eager seconds over auto seconds
(above 1: the dispatched layer is faster). Before timing, the two results are
compared (a fast wrong answer is no result).

The must-hold: no layer's ratio below 0.95 (chosen never slower than eager beyond noise); the summary
lists the layers under it, if any.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile

import torch

import ranet_fast
from ranet_fast import dispatch
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.configs import IMAGE_SIZES

from .common import (DTYPES, MEMORY_FORMATS, add_run_arguments, benchmark_parser, geometric_mean, git_commit,
                     interleaved_samples, paired_ratio, provenance, write_json)

WORKLOADS = ("eval-forward", "train-step")
MUST_HOLD_RATIO = 0.95


def _fast_modules(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    return {module: name for name, module in model.named_modules()
            if type(module).__module__.startswith("ranet_fast.nn")}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _detached(value):
    """The recorded inputs as leaves of their own, requiring grad where the model's did."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


def record_layer_inputs(model, x, train: bool) -> tuple[list[tuple[str, torch.nn.Module, tuple]], dict[tuple, int]]:
    """(name, module, args) of the first call of each distinct key in one forward, in call order, and
    how many calls each key had."""
    calls, counts = [], {}
    modules = _fast_modules(model)

    def hook(module, args):
        key = _key(module, args, train)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] == 1:  # only the first is kept: the inputs of a whole model take gigabytes
            calls.append((modules[module], module, _detached(args)))

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        with dispatch.layer_path("eager"), (contextlib.nullcontext() if train else torch.no_grad()):
            model.train(train)(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, counts


def _call(module, args, train: bool, path: str):
    """One call of the layer as the workload runs it (train: forward and backward), path forced or auto."""
    with dispatch.layer_path(path), (contextlib.nullcontext() if train else torch.no_grad()):
        outputs = module(*args)
        if train:
            tensors = [t for t in _tensors(outputs) if t.requires_grad]
            torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
        return outputs


def _own_choice(record, module) -> str:
    """The layer's own choice among the recorded picks (nested layers pick too)."""
    signature = module.__dict__.get("_ranet_fast_signature")
    own = [choice for kind, key, choice in record if kind == "layer" and key[0] == type(module).__name__
           and key[1] == signature]
    return own[-1] if own else "eager (no fused path applies)"


def time_layer(name, module, args, train: bool, options) -> dict:
    _call(module, args, train, "auto")  # measures and chooses (first use of its key)
    with dispatch.recording() as record:
        auto_result = _call(module, args, train, "auto")  # as every later call: the kept choices
    eager_result = _call(module, args, train, "eager")
    for got, expected in zip(_tensors(auto_result), _tensors(eager_result)):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * max(1.0, expected.abs().max().item()))
    ops: dict[str, int] = {}
    for kind, key, choice in record:
        if kind == "op":
            ops[f"{key[0]}:{choice}"] = ops.get(f"{key[0]}:{choice}", 0) + 1
    samples = interleaved_samples({"auto": lambda: _call(module, args, train, "auto"),
                                   "eager": lambda: _call(module, args, train, "eager")},
                                  options.repeats, options.min_run_time)
    return {"layer": name, "class": type(module).__name__, "path": _own_choice(record, module), "ops": ops,
            "input_shapes": [list(t.shape) for t in _tensors(args)],
            "seconds": {contender: statistics.median(values) for contender, values in samples.items()},
            "ratio": paired_ratio(samples, "eager", "auto")}


def _key(module, args, train: bool) -> tuple:
    return (type(module).__name__, repr(module), train,
            tuple((tuple(t.shape), t.stride(), t.requires_grad) for t in _tensors(args)))


def run_config(config: str, workload: str, options, device, dtype) -> list[dict]:
    torch.manual_seed(0)
    model = ranet_fast.convert(RANet(ranet_config(config))).to(device=device, dtype=dtype)
    size = IMAGE_SIZES[ranet_config(config).data]
    x = torch.randn(options.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    x = x.contiguous(memory_format=MEMORY_FORMATS[options.layout])
    model = model.to(memory_format=MEMORY_FORMATS[options.layout])
    train = workload == "train-step"
    rows = []
    calls, counts = record_layer_inputs(model, x, train)
    for name, module, args in calls[:options.max_layers]:
        row = {"config": config, "workload": workload, "count": counts[_key(module, args, train)],
               **time_layer(name, module, args, train, options)}
        rows.append(row)
        print(f"{config:<9} {workload:<12} {row['layer']:<40} {row['class']:<17} {row['path']:<6} "
              f"{row['seconds']['auto'] * 1e3:>8.3f}ms {row['seconds']['eager'] * 1e3:>8.3f}ms {row['ratio']:>6.2f}x  "
              + " ".join(f"{op}x{n}" for op, n in row["ops"].items()), flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["workload"]), []).append(row)
    return [{"config": config, "workload": workload, "layers": len(group),
             "fused": sum(r["path"] == "fused" for r in group), "eager": sum(r["path"] != "fused" for r in group),
             "min_ratio": min(r["ratio"] for r in group), "geomean_ratio": geometric_mean([r["ratio"] for r in group]),
             "below_must_hold": [r["layer"] for r in group if r["ratio"] < MUST_HOLD_RATIO]}
            for (config, workload), group in groups.items()]


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--configs", nargs="+", default=["cifar-c1", "cifar-c3"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--max-layers", type=int, help="time only the first this many distinct layers per part")
    parser.add_argument("--cache-dir", help="the dispatch cache directory (default: a fresh temporary one)")
    add_run_arguments(parser, repeats=5, min_run_time=0.05)
    options = parser.parse_args(argv)
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    commit = git_commit()  # now: the checkout may move while a long run goes on
    rows = []
    with contextlib.ExitStack() as stack:
        cache = options.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ranet_fast-dispatch-"))
        stack.enter_context(_environment(dispatch.CACHE_DIR_ENV_VAR, cache))
        stack.enter_context(dispatch.tuning(True))
        dispatch.forget_choices()
        print(f"{'config':<9} {'workload':<12} {'layer':<40} {'class':<17} {'path':<6} {'auto':>10} {'eager':>10} "
              f"{'ratio':>7}  ops:backend x calls")
        for config in options.configs:
            for workload in options.workloads:
                rows += run_config(config, workload, options, device, dtype)
                # Written after every part, so a run stopped by a deadline keeps what it measured.
                write_json(options.json, result_record(options, commit, device, rows, complete=False))
    result = result_record(options, commit, device, rows, complete=True)
    for line in result["summary"]:
        print(f"{line['config']} {line['workload']}: {line['layers']} layers ({line['fused']} fused, "
              f"{line['eager']} eager), ratio min {line['min_ratio']:.2f}x, geomean {line['geomean_ratio']:.2f}x, "
              f"below {MUST_HOLD_RATIO}: {line['below_must_hold'] or 'none'}")
    write_json(options.json, result)
    return result


def result_record(options, commit, device, rows, complete: bool) -> dict:
    return {**provenance("dispatch", commit), "complete": complete, "device": str(device),
            "device_name": dispatch.device_name(device), "dtype": options.dtype, "layout": options.layout,
            "must_hold_ratio": MUST_HOLD_RATIO,
            "options": {k: v for k, v in vars(options).items() if k not in ("json", "cache_dir")},
            "summary": summary(rows), "rows": rows}


@contextlib.contextmanager
def _environment(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous
