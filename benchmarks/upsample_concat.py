"""upsample_concat vs eager (interpolate + cat) vs torch.compile on every fusion-layer shape of RANet.

    python -m benchmarks upsample_concat --configs cifar-c1 cifar-c3 imagenet-1 --batch 64 256 \
        --device cuda --dtype bf16 --json benchmarks/results/upsample_concat-h100.json

The shapes are recorded from the eager model's fusion layers (ConvUpNormal and the end of every
_BlockUpNormal) with forward hooks, deduplicated, and timed side by side in one run: forward, and
forward + backward of a random weighting of the output. Eager is the official computation: one
F.interpolate per part (the identity ones included) and torch.cat. Each figure is the median of
``--repeats`` measurements of torch.utils.benchmark (which synchronises CUDA); ratios are the
fused op's speed-up over each contender. Speed targets are checked by this script's
summary (geometric means), never by a unit test.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from ranet_fast.models.ranet import ConvUpNormal, _BlockUpNormal
from ranet_fast.ops import upsample_concat

from .common import (DTYPES, MEMORY_FORMATS, add_model_arguments, add_run_arguments, allow_recompiles, benchmark_parser,
                     forward_with_hooks, geometric_mean, median_seconds, provenance, write_json)


def _out_channels(branch: torch.nn.Module) -> int:
    return [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels


def fusion_shapes(config: str) -> list[tuple[tuple[tuple[int, int, int], ...], tuple[int, int]]]:
    """Distinct (part shapes [C, H, W] ..., target size) of every fusion concat in ``config``."""
    shapes: "OrderedDict[tuple, None]" = OrderedDict()

    def layer_hook(module, inputs, output):
        x_low, x_cur = inputs[0]
        up_channels = _out_channels(module.conv_up)
        res_channels = output.shape[1] - x_cur.shape[1] - up_channels
        size = tuple(output.shape[-2:])
        parts = ((x_cur.shape[1], *x_cur.shape[-2:]), (up_channels, *x_low.shape[-2:]), (res_channels, *size))
        shapes[(parts, size)] = None

    def block_hook(module, inputs, output):
        low = inputs[1][module.num_layers]
        last_output = output[1][-1]
        parts = ((last_output.shape[1], *last_output.shape[-2:]),
                 (_out_channels(module.conv_last), *low.shape[-2:]))
        shapes[(parts, tuple(last_output.shape[-2:]))] = None

    forward_with_hooks(config, lambda model: [(m, layer_hook) for m in model.modules() if isinstance(m, ConvUpNormal)]
                       + [(m, block_hook) for m in model.modules() if isinstance(m, _BlockUpNormal)])
    return list(shapes)


def eager_concat(parts: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=True) for p in parts], dim=1)


def fused_concat(parts: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return upsample_concat(parts, size)


def run_case(parts_shapes, size, batch, device, dtype, layout, contenders, repeats, min_run_time):
    parts = [torch.randn(batch, *shape, device=device, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[layout])
             for shape in parts_shapes]
    out_bytes = batch * sum(s[0] for s in parts_shapes) * size[0] * size[1] * parts[0].element_size()
    row = {"parts": [list(s) for s in parts_shapes], "size": list(size), "batch": batch,
           "output_mbytes": out_bytes / 2**20, "forward_s": {}, "train_s": {}}
    grads = [p.detach().clone().requires_grad_(True) for p in parts]
    weight = torch.randn(batch, sum(s[0] for s in parts_shapes), *size, device=device, dtype=dtype)
    for name, fn in contenders.items():
        with torch.no_grad():
            fn(parts, size)  # warm-up (and compilation)
        row["forward_s"][name] = median_seconds(lambda: fn(parts, size), repeats, min_run_time)

        def train_step(fn=fn):
            for g in grads:
                g.grad = None
            (fn(grads, size) * weight).sum().backward()

        train_step()
        row["train_s"][name] = median_seconds(train_step, repeats, min_run_time)
    return row


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    add_model_arguments(parser, configs=["cifar-c1", "cifar-c3", "imagenet-1"], batch=[64, 256])
    add_run_arguments(parser)
    options = parser.parse_args(argv)

    contenders = {"fused": fused_concat, "eager": eager_concat}
    if not options.no_compile:
        allow_recompiles()
        contenders["compile"] = torch.compile(eager_concat, dynamic=False)
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    rows = []
    header = f"{'config':<11} {'batch':>5} {'parts (C,H,W) -> size':<44} {'MB':>7} " + " ".join(
        f"{'fwd ' + n:>12}" for n in contenders) + "  fused speed-up fwd/train vs " + ", ".join(
        n for n in contenders if n != "fused")
    print(header)
    for config in options.configs:
        for parts_shapes, size in fusion_shapes(config):
            for batch in options.batch:
                row = run_case(parts_shapes, size, batch, device, dtype, options.layout, contenders,
                               options.repeats, options.min_run_time)
                row["config"] = config
                rows.append(row)
                speedups = [f"{row['forward_s'][n] / row['forward_s']['fused']:.2f}/"
                            f"{row['train_s'][n] / row['train_s']['fused']:.2f}" for n in contenders if n != "fused"]
                described = " ".join("x".join(map(str, s)) for s in parts_shapes) + f" -> {size[0]}x{size[1]}"
                print(f"{config:<11} {batch:>5} {described:<44} {row['output_mbytes']:>7.1f} "
                      + " ".join(f"{row['forward_s'][n] * 1e6:>10.1f}us" for n in contenders)
                      + "  " + ", ".join(speedups), flush=True)
    summary = {}
    for other in (n for n in contenders if n != "fused"):
        for phase in ("forward_s", "train_s"):
            summary[f"{phase[:-2]}_speedup_vs_{other}"] = geometric_mean(
                [row[phase][other] / row[phase]["fused"] for row in rows])
    print("geometric-mean speed-up of fused: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    result = {**provenance("upsample_concat"), "device": str(device), "dtype": options.dtype,
              "layout": options.layout, "summary": summary, "rows": rows}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
