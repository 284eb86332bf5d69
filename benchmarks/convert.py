"""ranet_fast.convert on models ranet_fast did not write: converted vs eager (vs torch.compile), eval forward.

    python -m benchmarks convert --no-compile --repeats 9 --json benchmarks/results/convert-cpu-zoo.json   # the zoo
    python -m benchmarks convert --models resnet18 densenet-small --batch 32 --size 64

Each model comes from torchvision or timm (``pretrained=False``: random weights) with random BN
statistics, in eval mode without gradients: the eager model, ``ranet_fast.convert`` of a copy, and
(unless ``--no-compile``) ``torch.compile`` of the eager model. ``convert`` gets the benchmark's
input as its example (``report=True, example_inputs=(x,)``), so the measured dispatch (tuning on)
decides per fast module, fused or original, before the timing starts, in a dispatch cache
directory of the run's own (fresh measurements, nothing from earlier runs); each row counts the
chains by outcome (fused, original because fusion did not pay, no fused form, left alone). The
converted model's logits are checked against eager's before anything is timed. In every one of
``--repeats`` rounds each contender is timed once (torch.utils.benchmark's blocked_autorange,
which synchronises CUDA), in turn, so that slow phases of a shared machine hit every contender
alike; times are medians over rounds, and the speed ratio eager / converted is the median over
rounds of that round's ratio. An A/A control, a copy of the eager model made as the converted one
is, is timed beside them: its ratio to eager (``control_ratio``) is the noise of this machine on
this model. Per model the result has the fused chains (``segments``), the speed ratio and the
control; the summary the median and smallest speed ratio and the control's range.

``ZOO`` is also the model list of tests/test_convert_zoo.py, which checks every model exact.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision

from ranet_fast import dispatch
from ranet_fast.nn import convert

from .common import (DTYPES, MEMORY_FORMATS, add_run_arguments, benchmark_parser, interleaved_samples, paired_ratio, provenance,
                     write_json)


@dataclass(frozen=True)
class ZooModel:
    """One CNN of the zoo: where it comes from, its family, how to build it (random weights, 10 classes)."""

    library: str  # "torchvision" or "timm"
    family: str
    build: Callable[[], nn.Module]
    has_batch_norm: bool = True  # without BN there is nothing to fuse (ConvNeXt: LayerNorm)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # a test and benchmark dependency only

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


_tv = torchvision.models
ZOO: dict[str, ZooModel] = {
    "tv_resnet18": ZooModel("torchvision", "ResNet", lambda: _tv.resnet18(num_classes=10)),
    "tv_resnext50_32x4d": ZooModel("torchvision", "ResNeXt", lambda: _tv.resnext50_32x4d(num_classes=10)),
    "tv_densenet121": ZooModel("torchvision", "DenseNet", lambda: _tv.densenet121(num_classes=10)),
    "tv_mobilenet_v2": ZooModel("torchvision", "MobileNetV2", lambda: _tv.mobilenet_v2(num_classes=10)),
    "tv_mobilenet_v3_small": ZooModel("torchvision", "MobileNetV3", lambda: _tv.mobilenet_v3_small(num_classes=10)),
    "tv_efficientnet_b0": ZooModel("torchvision", "EfficientNet", lambda: _tv.efficientnet_b0(num_classes=10)),
    "tv_regnet_y_400mf": ZooModel("torchvision", "RegNet", lambda: _tv.regnet_y_400mf(num_classes=10)),
    "tv_googlenet": ZooModel("torchvision", "GoogLeNet", lambda: _tv.googlenet(num_classes=10, aux_logits=False,
                                                                                init_weights=False)),
    "tv_shufflenet_v2_x0_5": ZooModel("torchvision", "ShuffleNet", lambda: _tv.shufflenet_v2_x0_5(num_classes=10)),
    "tv_mnasnet0_5": ZooModel("torchvision", "MNASNet", lambda: _tv.mnasnet0_5(num_classes=10)),
    "timm_resnet18d": ZooModel("timm", "ResNet-D", _timm("resnet18d")),
    "timm_tinynet_e": ZooModel("timm", "EfficientNet", _timm("tinynet_e")),
    "timm_mobilenetv3_small_100": ZooModel("timm", "MobileNetV3", _timm("mobilenetv3_small_100")),
    "timm_densenet121": ZooModel("timm", "DenseNet", _timm("densenet121")),
    "timm_regnetx_002": ZooModel("timm", "RegNet", _timm("regnetx_002")),
    "timm_dla34": ZooModel("timm", "DLA", _timm("dla34")),
    "timm_cspresnet50": ZooModel("timm", "CSPNet", _timm("cspresnet50")),
    "timm_ghostnet_100": ZooModel("timm", "GhostNet", _timm("ghostnet_100")),
    "timm_rexnet_100": ZooModel("timm", "ReXNet", _timm("rexnet_100")),
    "timm_selecsls42b": ZooModel("timm", "SelecSLS", _timm("selecsls42b")),
    "timm_ese_vovnet19b_dw": ZooModel("timm", "VoVNet", _timm("ese_vovnet19b_dw")),
    "timm_hrnet_w18_small": ZooModel("timm", "HRNet", _timm("hrnet_w18_small")),
    "timm_repvgg_a0": ZooModel("timm", "RepVGG", _timm("repvgg_a0")),
    "timm_lcnet_050": ZooModel("timm", "LCNet", _timm("lcnet_050")),
    "timm_convnext_atto": ZooModel("timm", "ConvNeXt", _timm("convnext_atto"), has_batch_norm=False),
}

MODELS: dict[str, Callable[[], nn.Module]] = {
    **{name: model.build for name, model in ZOO.items()},
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=1000),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=1000),
    "densenet-small": lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                          num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=1000),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=1000),
}


def fused_segments(counts: dict[str, int]) -> int:
    """The fused chains among convert's counts (its patterns, e.g. ``conv-bn-relu``; not the counts of
    modules holding them, ``graph``/``chain``/``concat-chain``, nor those of known classes)."""
    return sum(n for key, n in counts.items() if "conv" in key and key[0].islower())


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
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[layout])
    with torch.no_grad():
        fast, report = convert(copy.deepcopy(eager), report=True, example_inputs=(x,))
    outcomes = {}
    for status in report.chains():
        label = status.outcome if status.category is None else f"{status.outcome} ({status.category})"
        outcomes[label] = outcomes.get(label, 0) + 1
    # The A/A control: a copy of the eager model, made as the converted one is, timed beside it.
    # Its ratio to eager is what the machine alone does to a ratio (memory placement, drift).
    models = {"converted": fast, "eager": eager, "eager copy": copy.deepcopy(eager)}
    if compile_model:
        models["compile"] = torch.compile(eager, dynamic=False)
    with torch.no_grad():
        reference = eager(x)
        for contender, model in models.items():
            result = model(x)  # warm-up (and compilation)
            if contender == "converted":  # a wrong result would make the timing meaningless
                tolerance = 1e-3 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(result, reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())
        samples = interleaved_samples({c: (lambda m=m: m(x)) for c, m in models.items()}, repeats, min_run_time)
    seconds = {contender: statistics.median(values) for contender, values in samples.items()}
    return {"model": name, "batch": batch, "size": size, "forward_s": seconds,
            "speedup": paired_ratio(samples, "eager", "converted"),
            "control_ratio": paired_ratio(samples, "eager", "eager copy"), "segments": fused_segments(fast.ranet_fast_converted),
            "converted": fast.ranet_fast_converted, "left_alone": len(report.left_alone), "chain_outcomes": outcomes}


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(ZOO), help="default: the zoo")
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    add_run_arguments(parser)
    options = parser.parse_args(argv)
    os.environ[dispatch.CACHE_DIR_ENV_VAR] = tempfile.mkdtemp(prefix="ranet_fast-convert-bench-")
    dispatch.forget_choices()

    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    contenders = ["converted", "eager", "eager copy"] + ([] if options.no_compile else ["compile"])
    print(f"{'model':<28} {'batch':>5} " + " ".join(f"{n:>12}" for n in contenders)
          + "  converted speed-up vs " + ", ".join(contenders[1:]))
    rows = []
    for name in options.models:
        for batch in options.batch:
            with dispatch.tuning(True):
                row = run_model(name, batch, options.size, device, dtype, options.layout, not options.no_compile,
                                options.repeats, options.min_run_time)
            rows.append(row)
            seconds = row["forward_s"]
            print(f"{name:<28} {batch:>5} " + " ".join(f"{seconds[n] * 1e3:>10.2f}ms" for n in contenders) + "  "
                  + ", ".join(f"{seconds[n] / seconds['converted']:.2f}x" for n in contenders[1:]), flush=True)
    speedups = [row["speedup"] for row in rows]
    controls = [row["control_ratio"] for row in rows]
    # Chains convert found (segments) and chains that run fused after the dispatch and the whole-model
    # check decided (chain outcome "fused"): on a device where fusion does not pay they differ.
    summary = {"models": len(rows), "with_fused_chains": sum(row["segments"] > 0 for row in rows),
               "running_fused_chains": sum(row["chain_outcomes"].get("fused", 0) > 0 for row in rows),
               "median_speedup": statistics.median(speedups), "min_speedup": min(speedups),
               "control_min": min(controls), "control_max": max(controls)}
    print(f"{summary['with_fused_chains']} of {summary['models']} with fused chains, "
          f"{summary['running_fused_chains']} running some fused; speed-up vs eager: median "
          f"{summary['median_speedup']:.3f}x, smallest {summary['min_speedup']:.3f}x; A/A control (eager vs a copy "
          f"of it) {summary['control_min']:.3f}x to {summary['control_max']:.3f}x")
    result = {**provenance("convert"), "device": str(device), "dtype": options.dtype, "layout": options.layout,
              "size": options.size, "repeats": options.repeats, "min_run_time": options.min_run_time,
              "rows": rows, "summary": summary}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
