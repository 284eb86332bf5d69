"""Fused conv -> BN -> ReLU vs eager vs torch.compile on every conv layer shape of RANet, eval and train.

    python -m benchmarks fused_conv2d --configs cifar-c1 cifar-c3 --batch 64 --device cuda --dtype bf16 \
        --json benchmarks/results/fused_conv2d-h100.json

The shapes are recorded from the eager model with forward hooks on every conv that is followed by
a BN and a ReLU (ConvBasic and ConvBN: all of RANet's but the ImageNet stem), deduplicated, and
timed side by side in one run, forward in eval mode without gradients: the fused op with the BN
folded into its epilogue (as the converted layers call it, folding cached), the eager
nn.Sequential(Conv2d, BatchNorm2d, ReLU) (the official computation) and torch.compile of it. Each
figure is the median of ``--repeats`` measurements of torch.utils.benchmark (which synchronises
CUDA); ratios are the fused op's speed-up over each contender, summarised as geometric means.
Train mode (forward + backward of fresh train-mode copies, batch statistics): the fast layer's
recomputing chain (``ranet_fast.nn.train_mode``: fused_conv2d, batch_norm_stats,
batch_norm_relu, and in backward batch_norm_relu_backward + aten.convolution_backward) against
the eager layer and torch.compile of it.

The whole-model lines time a converted model's eval forward (fused layers, concat-free dense
blocks) and a training step's forward + backward (sum of the exits' losses) against the eager
model's, and report the activation memory of the training step: the bytes of the distinct
storages autograd saves for backward (a device-independent measure, from saved-tensor hooks) and,
on CUDA, the peak of torch.cuda.max_memory_allocated over the step.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn as nn

from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.configs import IMAGE_SIZES
from ranet_fast.models.ranet import ConvBasic, ConvBN
from ranet_fast.nn import convert
from ranet_fast.nn.dense import FastConvBasic

from .common import (DTYPES, MEMORY_FORMATS, add_model_arguments, add_run_arguments, allow_recompiles, benchmark_parser,
                     distinct_shapes, forward_with_hooks, geometric_mean, median_seconds, provenance, write_json)


def conv_shapes(config: str) -> list[tuple[int, int, int, int, int, int, int]]:
    """Distinct (Ci, H, W, Co, kernel, stride, padding) of the conv -> BN -> ReLU layers of ``config``."""
    shapes: "OrderedDict[tuple, None]" = OrderedDict()

    def hook(module, inputs, output):
        x = inputs[0]
        shapes[(x.shape[1], x.shape[2], x.shape[3], module.out_channels, module.kernel_size[0], module.stride[0],
                module.padding[0])] = None

    forward_with_hooks(config, lambda model: [
        (conv, hook) for parent in model.modules() if isinstance(parent, (ConvBasic, ConvBN))
        for conv in parent.modules() if isinstance(conv, nn.Conv2d)])
    return list(shapes)


def eager_layer(shape, device, dtype) -> nn.Module:
    """The official conv -> BN -> ReLU of a shape, eval mode, with random BN statistics."""
    in_channels, _, _, out_channels, kernel, stride, padding = shape
    layer = ConvBasic(in_channels, out_channels, kernel=kernel, stride=stride, padding=padding)
    bn = layer.net[1]
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return layer.to(device=device, dtype=dtype).eval().requires_grad_(False)


def run_case(shape, batch, device, dtype, layout, compile_layers, repeats, min_run_time):
    in_channels, height, width = shape[:3]
    x = torch.randn(batch, in_channels, height, width, device=device, dtype=dtype).contiguous(
        memory_format=MEMORY_FORMATS[layout])
    eager = eager_layer(shape, device, dtype)
    fused = copy.deepcopy(eager)
    fused.__class__ = FastConvBasic  # what ranet_fast.convert does
    contenders = {"fused": fused, "eager": eager}
    if compile_layers:
        contenders["compile"] = torch.compile(copy.deepcopy(eager), dynamic=False)
    row = {"shape": dict(zip(("in_channels", "height", "width", "out_channels", "kernel", "stride", "padding"),
                             shape)), "batch": batch, "forward_s": {}}
    with torch.no_grad():
        reference = eager(x)
        for name, layer in contenders.items():
            result = layer(x)  # warm-up (and compilation)
            if name == "fused":
                # A wrong result would make the timing meaningless.
                tolerance = 1e-3 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(result, reference, rtol=tolerance, atol=tolerance)
            row["forward_s"][name] = median_seconds(lambda layer=layer: layer(x), repeats, min_run_time)
    row["train_s"] = time_train_step(eager, x, compile_layers, repeats, min_run_time)
    return row


def time_train_step(eval_layer, x, compile_layers, repeats, min_run_time) -> dict:
    """Forward + backward of train-mode copies of the layer: fused (FastConvBasic), eager, compiled."""
    eager = copy.deepcopy(eval_layer).train().requires_grad_(True)
    fused = copy.deepcopy(eager)
    fused.__class__ = FastConvBasic
    contenders = {"fused": fused, "eager": eager}
    if compile_layers:
        contenders["compile"] = torch.compile(copy.deepcopy(eager), dynamic=False)
    x = x.detach().requires_grad_()
    reference = copy.deepcopy(eager)(x)
    grad = torch.randn_like(reference)
    seconds = {}
    for name, layer in contenders.items():
        result = layer(x)  # warm-up (and compilation)
        if name == "fused":
            tolerance = 1e-3 if x.dtype == torch.float32 else 5e-2
            torch.testing.assert_close(result, reference, rtol=tolerance, atol=tolerance)
        result.backward(grad)
        seconds[name] = median_seconds(lambda layer=layer: layer(x).backward(grad), repeats, min_run_time)
    return seconds


def saved_activation_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves while ``step()`` runs its forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def run_model(config, batch, device, dtype, layout, repeats, min_run_time):
    """Eval forward and a training step's forward + backward of the whole model: converted vs eager."""
    args = ranet_config(config)
    eager = RANet(args).to(device=device, dtype=dtype).eval().requires_grad_(False)
    fast = convert(copy.deepcopy(eager))
    size = IMAGE_SIZES[args.data]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[layout])
    row = {"config": config, "batch": batch, "forward_s": {}, "train_s": {}, "saved_activation_mib": {},
           "peak_train_mib": {}}
    with torch.no_grad():
        for name, model in (("fused", fast), ("eager", eager)):
            model(x)
            row["forward_s"][name] = median_seconds(lambda model=model: model(x), repeats, min_run_time)
    for name, model in (("fused", fast), ("eager", eager)):
        model.train().requires_grad_(True)

        def step(model=model):
            sum(logits.float().square().mean() for logits in model(x)).backward()

        row["saved_activation_mib"][name] = saved_activation_bytes(lambda model=model: model(x)) / 2**20
        if device.type == "cuda":
            model.zero_grad(set_to_none=False)
            step()  # gradients allocated, so the peak below is the step's own
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            row["peak_train_mib"][name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["train_s"][name] = median_seconds(step, repeats, min_run_time)
    return row


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    add_model_arguments(parser, configs=["cifar-c1", "cifar-c3"], batch=[64], max_shapes_option=True)
    parser.add_argument("--no-model", action="store_true", help="leave the whole-model comparison out")
    add_run_arguments(parser)
    options = parser.parse_args(argv)

    if not options.no_compile:
        allow_recompiles()
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    contenders = ["fused", "eager"] + ([] if options.no_compile else ["compile"])
    print(f"{'config':<9} {'batch':>5} {'Ci x H x W -> Co, k/s/p':<28} "
          + " ".join(f"{'fwd ' + n:>12}" for n in contenders) + " ".join(f"{'train ' + n:>14}" for n in contenders)
          + "  fused speed-up (fwd; train) vs "
          + ", ".join(contenders[1:]))
    rows = []
    for config, shape in distinct_shapes(options.configs, conv_shapes, options.max_shapes):
        for batch in options.batch:
            row = run_case(shape, batch, device, dtype, options.layout, not options.no_compile,
                           options.repeats, options.min_run_time)
            row["config"] = config
            rows.append(row)
            ci, h, w, co, k, s, p = shape
            described = f"{ci}x{h}x{w} -> {co}, {k}/{s}/{p}"
            print(f"{config:<9} {batch:>5} {described:<28} "
                  + " ".join(f"{row['forward_s'][n] * 1e6:>10.1f}us" for n in contenders)
                  + " ".join(f"{row['train_s'][n] * 1e6:>12.1f}us" for n in contenders) + "  "
                  + ", ".join(f"{row['forward_s'][n] / row['forward_s']['fused']:.2f}; "
                              f"{row['train_s'][n] / row['train_s']['fused']:.2f}" for n in contenders[1:]),
                  flush=True)
    summary = {f"{mode}_speedup_vs_{other}": geometric_mean([row[f"{mode}_s"][other] / row[f"{mode}_s"]["fused"]
                                                             for row in rows])
               for mode in ("forward", "train") for other in contenders[1:]}
    print(f"{len(rows)} layer shapes; geometric-mean speed-up of fused: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    models = []
    if not options.no_model:
        for config in options.configs:
            for batch in options.batch:
                row = run_model(config, batch, device, dtype, options.layout, options.repeats, options.min_run_time)
                models.append(row)
                fused_s, eager_s = row["forward_s"]["fused"], row["forward_s"]["eager"]
                print(f"whole model {config} batch {batch} eval forward: converted {fused_s * 1e3:.1f} ms, eager "
                      f"{eager_s * 1e3:.1f} ms, speed-up {eager_s / fused_s:.2f}x", flush=True)
                fused_s, eager_s = row["train_s"]["fused"], row["train_s"]["eager"]
                saved = row["saved_activation_mib"]
                print(f"whole model {config} batch {batch} train forward+backward: converted {fused_s * 1e3:.1f} ms, "
                      f"eager {eager_s * 1e3:.1f} ms, speed-up {eager_s / fused_s:.2f}x; saved activations "
                      f"{saved['fused']:.1f} vs {saved['eager']:.1f} MiB ({saved['fused'] / saved['eager']:.2f}x)"
                      + (f"; peak {row['peak_train_mib']['fused']:.1f} vs {row['peak_train_mib']['eager']:.1f} MiB"
                         if row["peak_train_mib"] else ""), flush=True)
    result = {**provenance("fused_conv2d"), "device": str(device), "dtype": options.dtype, "layout": options.layout,
              "summary": summary, "rows": rows, "models": models}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
