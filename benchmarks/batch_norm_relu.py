"""Train-mode BatchNorm + ReLU: the batch-norm ops vs eager F.batch_norm + ReLU vs torch.compile.

    python -m benchmarks batch_norm_relu --configs cifar-c1 cifar-c3 --batch 64 --device cuda --dtype bf16 \\
        --json benchmarks/results/batch_norm_relu-h100.json

The shapes are the distinct (C, H, W) inputs of every BatchNorm2d of the chosen RANets (recorded
with forward hooks), timed side by side in one run:

* forward: ``batch_norm_stats`` then ``batch_norm_relu`` with invstd = rsqrt(var + eps) (what a
  train-mode layer computes, running statistics aside) against eager
  ``relu(F.batch_norm(x, None, None, w, b, training=True))`` and torch.compile of it;
* train: that forward plus the backward, ``batch_norm_relu_backward`` against eager autograd
  (``torch.autograd.grad`` of the same expression for x, weight and bias) and the compiled one.

Each figure is the median of ``--repeats`` measurements of torch.utils.benchmark (which
synchronises CUDA); ratios are the ops' speed-up over each contender, summarised as geometric means.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ranet_fast.ops import batch_norm_relu, batch_norm_relu_backward, batch_norm_stats

from .common import (DTYPES, MEMORY_FORMATS, add_model_arguments, add_run_arguments, allow_recompiles, benchmark_parser,
                     distinct_shapes, forward_with_hooks, geometric_mean, median_seconds, provenance, write_json)

EPS = 1e-5


def bn_shapes(config: str) -> list[tuple[int, int, int]]:
    """Distinct (C, H, W) of the BatchNorm2d inputs of ``config`` (train mode)."""
    shapes: "OrderedDict[tuple, None]" = OrderedDict()

    def hook(module, inputs, output):
        shapes[tuple(inputs[0].shape[1:])] = None

    forward_with_hooks(config, lambda model: [(m, hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)],
                       train=True, batch=2)
    return list(shapes)


def fused_forward(x, weight, bias):
    mean, var = batch_norm_stats(x)
    invstd = torch.rsqrt(var + EPS)
    return batch_norm_relu(x, mean, invstd, weight, bias), mean, invstd


def fused_train(x, weight, bias, grad_out):
    y, mean, invstd = fused_forward(x, weight, bias)
    return y, batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias)


def eager_forward(x, weight, bias):
    return torch.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS))


def eager_train(x, weight, bias, grad_out):
    y = eager_forward(x, weight, bias)
    return y, torch.autograd.grad(y, (x, weight, bias), grad_out)


def run_case(shape, batch, device, dtype, layout, compiled, repeats, min_run_time):
    channels = shape[0]
    x = torch.randn(batch, *shape, device=device, dtype=dtype) * 2 + 1
    x = x.contiguous(memory_format=MEMORY_FORMATS[layout])
    grad_out = torch.randn_like(x)
    weight = torch.rand(channels, device=device) + 0.5
    bias = torch.randn(channels, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    # The ops take the parameters in float32 (their accumulation dtype); eager gets them in x's
    # dtype, as a model converted to that dtype holds them.
    eager_leaves = [leaves[0]] + [t.detach().to(dtype).requires_grad_() for t in leaves[1:]]
    row = {"shape": dict(zip(("channels", "height", "width"), shape)), "batch": batch, "forward_s": {}, "train_s": {}}
    with torch.no_grad():
        fused_y = fused_forward(x, weight, bias)[0]
        reference = eager_forward(x.double(), weight.double(), bias.double())
        # A wrong result would make the timing meaningless.
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(fused_y.double(), reference, rtol=tolerance, atol=tolerance)
        row["forward_s"]["ops"] = median_seconds(lambda: fused_forward(x, weight, bias), repeats, min_run_time)
        row["forward_s"]["eager"] = median_seconds(lambda: eager_forward(x, *eager_leaves[1:]), repeats,
                                                   min_run_time)
        if compiled is not None:
            compiled["forward"](x, *eager_leaves[1:])
            row["forward_s"]["compile"] = median_seconds(lambda: compiled["forward"](x, *eager_leaves[1:]), repeats,
                                                         min_run_time)
    row["train_s"]["ops"] = median_seconds(lambda: fused_train(x, weight, bias, grad_out), repeats, min_run_time)
    row["train_s"]["eager"] = median_seconds(lambda: eager_train(*eager_leaves, grad_out), repeats, min_run_time)
    if compiled is not None:
        compiled["train"](*eager_leaves, grad_out)
        row["train_s"]["compile"] = median_seconds(lambda: compiled["train"](*eager_leaves, grad_out), repeats,
                                                   min_run_time)
    return row


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    add_model_arguments(parser, configs=["cifar-c1", "cifar-c3"], batch=[64], max_shapes_option=True)
    add_run_arguments(parser)
    options = parser.parse_args(argv)

    compiled = None
    if not options.no_compile:
        allow_recompiles()
        compiled = {"forward": torch.compile(eager_forward, dynamic=False),
                    "train": torch.compile(eager_train, dynamic=False)}
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    contenders = ["ops", "eager"] + ([] if options.no_compile else ["compile"])
    print(f"{'config':<9} {'batch':>5} {'C x H x W':<14} "
          + " ".join(f"{'fwd ' + n:>12}" for n in contenders) + " "
          + " ".join(f"{'train ' + n:>13}" for n in contenders) + "  ops speed-up fwd / train vs "
          + ", ".join(contenders[1:]))
    rows = []
    for config, shape in distinct_shapes(options.configs, bn_shapes, options.max_shapes):
        for batch in options.batch:
            row = run_case(shape, batch, device, dtype, options.layout, compiled, options.repeats,
                           options.min_run_time)
            row["config"] = config
            rows.append(row)
            forward, train = row["forward_s"], row["train_s"]
            print(f"{config:<9} {batch:>5} {'x'.join(map(str, shape)):<14} "
                  + " ".join(f"{forward[n] * 1e6:>10.1f}us" for n in contenders) + " "
                  + " ".join(f"{train[n] * 1e6:>11.1f}us" for n in contenders) + "  "
                  + ", ".join(f"{forward[n] / forward['ops']:.2f} / {train[n] / train['ops']:.2f}"
                              for n in contenders[1:]), flush=True)
    summary = {}
    for other in contenders[1:]:
        summary[f"forward_speedup_vs_{other}"] = geometric_mean([r["forward_s"][other] / r["forward_s"]["ops"]
                                                                 for r in rows])
        summary[f"train_speedup_vs_{other}"] = geometric_mean([r["train_s"][other] / r["train_s"]["ops"]
                                                               for r in rows])
    print(f"{len(rows)} BN shapes; geometric-mean speed-up of the ops: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    result = {**provenance("batch_norm_relu"), "device": str(device), "dtype": options.dtype, "layout": options.layout,
              "summary": summary, "rows": rows}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
