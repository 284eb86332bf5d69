"""The roofline floor of RANet's forward and training step on a GPU, computed without one.

    python -m benchmarks roofline --configs cifar-c1 cifar-c3 imagenet-1 --batch 256 1024 \
        --json benchmarks/results/roofline-h200.json

Every leaf layer of the eager model is recorded with forward hooks on one image (its qualified
module name, or ``interpolate`` for a resize); per layer the
FLOPs (2 per multiply-add: convolutions and linear layers; BN, ReLU, pooling and resizing counted
as the few operations per element they are) and the minimal bytes (each input read once, each
weight read once, each output written once, in the dtype's width) scale with the batch. A layer's
floor is max(FLOPs / matmul rate, bytes / memory bandwidth) -- a kernel waits for the slower of
the two -- and the model's floor is the sum over layers (one kernel per layer, as eager runs them).
Two sums: ``eager`` (every layer its own pass over memory, as the official model runs) and
``fused`` (BN and ReLU folded into the convolutions and the resize+concat into one pass over its
output: what the fused layers can reach). The training step counts three times the forward's
FLOPs (forward, input gradient, weight gradient) and three times its bytes (the activations read
again for each gradient, the gradients written): a floor, not a prediction.

The results file keeps the per-layer figures too (``layers``, one table per configuration, a row
per layer in call order): name, kind, output shape, FLOPs, minimal bytes, the bytes eager spends
beyond them, whether the layer folds into a convolution, and its forward floor for one image
(``floor_ns``; both terms scale with the batch, so at batch B it is B times that), so that a
measured per-layer time can be set against its own floor.

Default rates are an H200's as measured on this workplace's machines: 790 TFLOP/s dense bf16,
4.3 TB/s device copy (bytes read + written per second). The GPU check measures both again in
its run (benchmarks/op_backends.py) and reports measured time as a multiple of the floor.
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.configs import IMAGE_SIZES

from .common import DTYPES, benchmark_parser, provenance

H200_BF16_FLOPS = 790e12
H200_COPY_BYTES = 4.3e12
# Elementwise layers: operations per element (a BN in eval is a multiply-add, in train about 8).
ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def layer_costs(config: str, element_size: int) -> list[dict]:
    """FLOPs and minimal bytes of every leaf layer and every resize+concat for one image."""
    args = ranet_config(config)
    model = RANet(args).eval()
    layers: list[dict] = []

    names = {module: name for name, module in model.named_modules()}

    def hook(module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops = 2 * module.in_channels // module.groups * kh * kw * output[0].numel()
            weight = module.weight.numel()
        elif isinstance(module, nn.Linear):
            flops, weight = 2 * module.weight.numel(), module.weight.numel()
        else:
            flops, weight = 2 * x[0].numel(), 0
        layers.append({"name": names[module], "kind": type(module).__name__,
                       "output_shape": list(output.shape[1:]), "flops": flops,
                       "bytes": (x[0].numel() + output[0].numel()) * element_size + weight * element_size,
                       "fusable": isinstance(module, ELEMENTWISE)})

    original_interpolate = F.interpolate

    def counting_interpolate(x, *a, **k):
        y = original_interpolate(x, *a, **k)
        # Resize + concat in one pass: read the input, write the output once (the concat's copy of
        # the resized part is the extra pass the fused op saves; counted on the eager side only).
        layers.append({"name": "interpolate", "kind": "interpolate", "output_shape": list(y.shape[1:]),
                       "flops": 8 * y[0].numel(),
                       "bytes": (x[0].numel() + y[0].numel()) * element_size, "fusable": False,
                       "eager_extra_bytes": 2 * y[0].numel() * element_size})
        return y

    handles = [m.register_forward_hook(hook) for m in model.modules() if len(list(m.children())) == 0
               and isinstance(m, (nn.Conv2d, nn.Linear, *ELEMENTWISE))]
    size = IMAGE_SIZES[args.data]
    F.interpolate = counting_interpolate
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
    finally:
        F.interpolate = original_interpolate
        for handle in handles:
            handle.remove()
    return layers


def floors(config: str, batch: int, dtype: torch.dtype, flops_rate: float, bytes_rate: float,
           layers: list[dict] | None = None) -> dict:
    """The whole model's floors at ``batch`` (``layers``: layer_costs of this config and dtype,
    computed here when not given)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    layers = layer_costs(config, element_size) if layers is None else layers

    def floor(flops, nbytes):
        return max(batch * flops / flops_rate, batch * nbytes / bytes_rate)

    eager = sum(floor(l["flops"], l["bytes"] + l.get("eager_extra_bytes", 0)) for l in layers)
    fused = sum(floor(l["flops"], l["bytes"]) for l in layers if not l["fusable"])
    flops = batch * sum(l["flops"] for l in layers)
    nbytes = batch * sum(l["bytes"] + l.get("eager_extra_bytes", 0) for l in layers)
    return {"config": config, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "layers": len(layers),
            "forward_gflops": flops / 1e9, "forward_eager_gbytes": nbytes / 1e9,
            "forward_floor_eager_s": eager, "forward_floor_fused_s": fused,
            "train_step_floor_eager_s": 3 * eager, "train_step_floor_fused_s": 3 * fused,
            "compute_bound_share": sum(1 for l in layers if l["flops"] / flops_rate > l["bytes"] / bytes_rate)
            / len(layers)}


LAYER_COLUMNS = ("name", "kind", "output_shape", "flops", "bytes", "eager_extra_bytes", "fusable", "floor_ns")


def layer_table(layers: list[dict], flops_rate: float, bytes_rate: float) -> dict:
    """Every layer's costs for one image, one row per layer. ``floor_ns``: its forward floor per
    image; both terms of the floor scale with the batch, so at batch B it is B times that."""
    rows = []
    for layer in layers:
        floor_ns = max(layer["flops"] / flops_rate, layer["bytes"] / bytes_rate) * 1e9
        rows.append([layer["name"], layer["kind"], layer["output_shape"], layer["flops"], layer["bytes"],
                     layer.get("eager_extra_bytes", 0), layer["fusable"], float(f"{floor_ns:.4g}")])
    return {"columns": list(LAYER_COLUMNS), "rows": rows}


def write_results(path: str | None, result: dict) -> None:
    """``write_json``'s file, but with each layer row on one line (thousands of rows)."""
    if not path:
        return
    tables = result["layers"]
    text = json.dumps({**result, "layers": {
        config: {**table, "rows": [f"@row {config} {i}@" for i in range(len(table["rows"]))]}
        for config, table in tables.items()}}, indent=2)
    text = re.sub(r'"@row (\S+) (\d+)@"', lambda match: json.dumps(tables[match[1]]["rows"][int(match[2])]), text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--configs", nargs="+", default=["cifar-c1", "cifar-c3", "imagenet-1"])
    parser.add_argument("--batch", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--flops-rate", type=float, default=H200_BF16_FLOPS, help="FLOP/s of the matrix unit")
    parser.add_argument("--bytes-rate", type=float, default=H200_COPY_BYTES, help="bytes/s of a device copy")
    parser.add_argument("--device-name", default="NVIDIA H200",
                        help="the device whose rates these are: recorded as the file's device (nothing is timed)")
    parser.add_argument("--json", help="write the results to this file")
    options = parser.parse_args(argv)
    dtype = DTYPES[options.dtype]
    costs = {config: layer_costs(config, torch.empty((), dtype=dtype).element_size()) for config in options.configs}
    rows = [floors(config, batch, dtype, options.flops_rate, options.bytes_rate, costs[config])
            for config in options.configs for batch in options.batch]
    print(f"{'config':<11} {'batch':>5} {'GFLOP':>8} {'GB eager':>9} {'fwd eager':>10} {'fwd fused':>10} "
          f"{'train fused':>11}")
    for row in rows:
        print(f"{row['config']:<11} {row['batch']:>5} {row['forward_gflops']:>8.1f} {row['forward_eager_gbytes']:>9.2f} "
              f"{row['forward_floor_eager_s'] * 1e3:>8.3f}ms {row['forward_floor_fused_s'] * 1e3:>8.3f}ms "
              f"{row['train_step_floor_fused_s'] * 1e3:>9.3f}ms")
    result = {**provenance("roofline"), "device": options.device_name, "flops_rate": options.flops_rate, "bytes_rate": options.bytes_rate,
              "rows": rows, "layers": {config: layer_table(layers, options.flops_rate, options.bytes_rate)
                                       for config, layers in costs.items()}}
    write_results(options.json, result)
    return result


if __name__ == "__main__":
    main()
