"""ranet_fast.convert on models ranet_fast did not write: converted vs eager vs torch.compile (eval forward).

    python -m benchmarks convert --models resnet18 densenet-small --batch 32 --size 64 --device cpu \
        --json benchmarks/results/convert-cpu.json

Each model comes from torchvision with random weights and random BN statistics, in eval mode
without gradients: the eager model, ``ranet_fast.convert`` of a copy, and (unless
``--no-compile``) ``torch.compile`` of the eager model. The converted model's logits are checked
against eager's before anything is timed. Each figure is the median over ``--repeats`` rounds; in
every round each contender is timed once (torch.utils.benchmark's blocked_autorange, which
synchronises CUDA), in turn, so that slow phases of a shared machine hit every contender alike.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torchvision

from ranet_fast.nn import convert

from .common import (DTYPES, MEMORY_FORMATS, add_run_arguments, benchmark_parser, interleaved_medians, provenance,
                     write_json)

MODELS = {
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=1000),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=1000),
    "densenet-small": lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                          num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=1000),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=1000),
}


def build(name: str, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def run_model(name, batch, size, device, dtype, layout, compile_model, repeats, min_run_time):
    eager = build(name, device, dtype)
    fast = convert(copy.deepcopy(eager))
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[layout])
    models = {"converted": fast, "eager": eager}
    if compile_model:
        models["compile"] = torch.compile(eager, dynamic=False)
    with torch.no_grad():
        reference = eager(x)
        for contender, model in models.items():
            result = model(x)  # warm-up (and compilation)
            if contender == "converted":  # a wrong result would make the timing meaningless
                tolerance = 1e-3 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(result, reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())
        seconds = interleaved_medians({c: (lambda m=m: m(x)) for c, m in models.items()}, repeats, min_run_time)
    return {"model": name, "batch": batch, "size": size, "forward_s": seconds,
            "converted": fast.ranet_fast_converted, "left_alone": len(fast.ranet_fast_report.left_alone)}


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet18", "densenet-small"])
    parser.add_argument("--batch", nargs="+", type=int, default=[32])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    add_run_arguments(parser)
    options = parser.parse_args(argv)

    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    contenders = ["converted", "eager"] + ([] if options.no_compile else ["compile"])
    print(f"{'model':<20} {'batch':>5} " + " ".join(f"{n:>12}" for n in contenders)
          + "  converted speed-up vs " + ", ".join(contenders[1:]))
    rows = []
    for name in options.models:
        for batch in options.batch:
            row = run_model(name, batch, options.size, device, dtype, options.layout, not options.no_compile,
                            options.repeats, options.min_run_time)
            rows.append(row)
            seconds = row["forward_s"]
            print(f"{name:<20} {batch:>5} " + " ".join(f"{seconds[n] * 1e3:>10.2f}ms" for n in contenders) + "  "
                  + ", ".join(f"{seconds[n] / seconds['converted']:.2f}x" for n in contenders[1:]), flush=True)
    result = {**provenance("convert"), "device": str(device), "dtype": options.dtype, "layout": options.layout, "size": options.size,
              "repeats": options.repeats, "rows": rows}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
