"""Every op on every backend that runs here, against eager, with each case's roofline floor.

    python -m benchmarks op_backends --device cuda --dtypes bf16 fp32 --configs cifar-c1 cifar-c3 imagenet-1 \
        --batch 256 --json op_backends-h200.json

For each op the cases are RANet's own shapes (recorded with forward hooks by the per-op benchmark
scripts: conv -> BN -> ReLU layers, fusion-layer concats, train-mode BatchNorms, the tensors alive
at an exit), the ``--max-shapes`` heaviest of each configuration by minimal bytes moved. Every
candidate is timed side by side in one run: each backend of the op that can run on the device
(``cuda``, ``triton``, ``cpu``; the op's pure-PyTorch ``reference``), and ``eager``, the official
computation with aten/cuDNN layers (F.conv2d + F.batch_norm + relu, F.interpolate + torch.cat,
F.batch_norm in training mode + autograd, index_select per tensor). Before timing, every
candidate's result is compared with eager's: a fast wrong answer is no result.

The floor of a case is max(FLOPs / matmul rate, minimal bytes / copy bandwidth), both rates
measured in the same run (``--ceilings``): a device-to-device copy (bytes read + written per
second) and a square matrix product in bf16 (fp32 on a CPU). Minimal bytes: every input read once,
every output written once. A candidate's ``x_floor`` is its time over the floor: how far it is
from what the hardware allows. Timing (``measure``): on a GPU, medians of ``--repeats`` samples of
back-to-back calls between CUDA events, as a caller sees them (host overhead included), and the same call captured in a CUDA
graph and replayed, the GPU's own time; on a CPU, torch.utils.benchmark medians. On a GPU the
inputs of small cases may stay in the 60 MB L2, so their floor is optimistic rather than wrong.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ranet_fast.ops import (batch_norm_relu, batch_norm_relu_backward, batch_norm_stats, exit_partition,
                            fused_conv2d, gather_rows, upsample_concat)

from .batch_norm_relu import bn_shapes
from .common import (DTYPES, MEMORY_FORMATS, backends_here, benchmark_parser, geometric_mean, median_seconds,
                     provenance, seconds_per_call, write_json)
from .fused_conv2d import conv_shapes
from .gather_rows import index_select_loop, live_shapes
from .upsample_concat import eager_concat, fusion_shapes

OPS = ("fused_conv2d", "upsample_concat", "batch_norm_relu", "batch_norm_relu_backward", "gather_rows",
       "exit_partition")
EPS = 1e-5


# ---------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------


def measure_ceilings(device: torch.device, repeats: int, min_run_time: float, small: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and matrix-product rate, measured here."""
    copy_bytes = (64 if small else 2048) * 2**20
    source = torch.randint(0, 256, (copy_bytes,), dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    copy_s = median_seconds(lambda: destination.copy_(source), repeats, min_run_time)
    size = 512 if small else 8192
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=matmul_dtype)
    b = torch.randn(size, size, device=device, dtype=matmul_dtype)
    matmul_s = median_seconds(lambda: a @ b, repeats, min_run_time)
    return {"copy_bytes_per_s": 2 * copy_bytes / copy_s, "copy_mbytes": copy_bytes / 2**20,
            "matmul_flops_per_s": 2 * size**3 / matmul_s, "matmul_size": size,
            "matmul_dtype": str(matmul_dtype).removeprefix("torch."), "inputs": "random (never zeros)"}


def floor_seconds(flops: float, nbytes: float, ceilings: dict, dtype: torch.dtype) -> float:
    # fp32 convolutions run as TF32 on Hopper's tensor cores at half the bf16 rate.
    rate = ceilings["matmul_flops_per_s"] / (2 if dtype == torch.float32 else 1)
    return max(flops / rate, nbytes / ceilings["copy_bytes_per_s"])


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    return tensor.contiguous(memory_format=MEMORY_FORMATS[layout])


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------
# Cases: (description, flops, minimal bytes, {candidate: callable}, checker)
# ---------------------------------------------------------------------------


def fused_conv2d_cases(config, batch, device, dtype, layout, generator):
    for shape in conv_shapes(config):
        ci, h, w, co, k, stride, padding = shape
        x = _layout(torch.randn(batch, ci, h, w, generator=generator).to(device, dtype), layout)
        weight = _layout((torch.randn(co, ci, k, k, generator=generator) / (ci * k * k) ** 0.5).to(device, dtype),
                         layout)
        scale = (torch.rand(co, generator=generator) + 0.5).to(device)
        shift = torch.randn(co, generator=generator).to(device)
        ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        flops = 2 * batch * co * ho * wo * ci * k * k
        nbytes = _nbytes(x, weight) + batch * co * ho * wo * x.element_size()
        mean, var = torch.zeros_like(scale), torch.ones_like(scale) - EPS  # eval BN == scale * y + shift

        def eager(x=x, weight=weight, scale=scale, shift=shift, mean=mean, var=var, stride=stride, padding=padding):
            y = F.conv2d(x, weight, stride=stride, padding=padding)
            return torch.relu(F.batch_norm(y, mean.to(y.dtype), var.to(y.dtype), scale.to(y.dtype), shift.to(y.dtype),
                                           training=False, eps=EPS))

        candidates = {"eager": eager}
        for backend in backends_here(device, "fused_conv2d"):
            candidates[backend] = (lambda x=x, weight=weight, scale=scale, shift=shift, stride=stride, padding=padding,
                                   backend=backend: fused_conv2d(x, weight, stride=stride, padding=padding,
                                                                 epilogue_scale=scale, epilogue_shift=shift,
                                                                 activation="relu", backend=backend))
        yield {"ci": ci, "h": h, "w": w, "co": co, "k": k, "stride": stride}, flops, nbytes, candidates


def upsample_concat_cases(config, batch, device, dtype, layout, generator):
    for parts_shapes, size in fusion_shapes(config):
        parts = [_layout(torch.randn(batch, *shape, generator=generator).to(device, dtype), layout)
                 for shape in parts_shapes]
        out_elements = batch * sum(s[0] for s in parts_shapes) * size[0] * size[1]
        nbytes = _nbytes(*parts) + out_elements * parts[0].element_size()
        candidates = {"eager": lambda parts=parts, size=size: eager_concat(parts, size)}
        for backend in backends_here(device, "upsample_concat"):
            candidates[backend] = (lambda parts=parts, size=size, backend=backend:
                                   upsample_concat(parts, size, backend=backend))
        # Bilinear taps: 4 multiply-adds per output element (memory-bound by a wide margin).
        yield {"parts": [list(s) for s in parts_shapes], "size": list(size)}, 8 * out_elements, nbytes, candidates


def batch_norm_relu_cases(config, batch, device, dtype, layout, generator):
    """Train-mode BN + ReLU forward: batch statistics, then the normalised, activated output."""
    for shape in bn_shapes(config):
        channels = shape[0]
        x = _layout((torch.randn(batch, *shape, generator=generator) * 2 + 1).to(device, dtype), layout)
        weight = (torch.rand(channels, generator=generator) + 0.5).to(device)
        bias = torch.randn(channels, generator=generator).to(device)

        def eager(x=x, weight=weight, bias=bias):
            return torch.relu(F.batch_norm(x, None, None, weight.to(x.dtype), bias.to(x.dtype), training=True, eps=EPS))

        candidates = {"eager": eager}
        for backend in backends_here(device, "batch_norm_relu"):
            def fused(x=x, weight=weight, bias=bias, backend=backend):
                mean, var = batch_norm_stats(x, backend=backend)
                return batch_norm_relu(x, mean, torch.rsqrt(var + EPS), weight, bias, backend=backend)
            candidates[backend] = fused
        yield {"c": channels, "h": shape[1], "w": shape[2]}, 8 * x.numel(), 2 * _nbytes(x), candidates


def batch_norm_relu_backward_cases(config, batch, device, dtype, layout, generator):
    """Train-mode BN + ReLU backward (input gradient and the affine parameters' gradients)."""
    for shape in bn_shapes(config):
        channels = shape[0]
        x = _layout((torch.randn(batch, *shape, generator=generator) * 2 + 1).to(device, dtype), layout)
        grad = _layout(torch.randn(batch, *shape, generator=generator).to(device, dtype), layout)
        weight = (torch.rand(channels, generator=generator) + 0.5).to(device)
        bias = torch.randn(channels, generator=generator).to(device)
        x_leaf = x.detach().requires_grad_()
        w_leaf, b_leaf = (t.to(dtype, copy=True).requires_grad_() for t in (weight, bias))
        eager_out = torch.relu(F.batch_norm(x_leaf, None, None, w_leaf, b_leaf, training=True, eps=EPS))
        mean, var = batch_norm_stats(x)
        invstd = torch.rsqrt(var + EPS)

        def eager(eager_out=eager_out, grad=grad, leaves=(x_leaf, w_leaf, b_leaf)):
            return torch.autograd.grad(eager_out, leaves, grad, retain_graph=True)

        candidates = {"eager": eager}
        for backend in backends_here(device, "batch_norm_relu"):
            candidates[backend] = (lambda grad=grad, x=x, mean=mean, invstd=invstd, weight=weight, bias=bias,
                                   backend=backend: batch_norm_relu_backward(grad, x, mean, invstd, weight, bias,
                                                                             backend=backend))
        yield {"c": channels, "h": shape[1], "w": shape[2]}, 12 * x.numel(), 3 * _nbytes(x), candidates


def gather_rows_cases(config, batch, device, dtype, layout, generator):
    """Every tensor alive at an exit compacted to half of the batch."""
    tensors = [_layout(torch.randn(batch, *shape, generator=generator).to(device, dtype), layout)
               for shape in live_shapes(config)]
    tensors.append(torch.arange(batch, device=device))
    index = torch.randperm(batch, generator=generator)[: max(1, batch // 2)].to(device)
    gathered = sum(t[0].numel() * t.element_size() for t in tensors) * index.numel()
    candidates = {"eager": lambda: index_select_loop(tensors, index)}
    for backend in backends_here(device, "gather_rows"):
        candidates[backend] = (lambda backend=backend: gather_rows(tensors, index, check_index=False,
                                                                     backend=backend))
    yield {"tensors": len(tensors), "kept": index.numel()}, 0, 2 * gathered + _nbytes(index), candidates


def exit_partition_cases(config, batch, device, dtype, layout, generator):
    classes = 1000 if config.startswith("imagenet") else (100 if "100" in config else 10)
    logits = torch.randn(batch, classes, generator=generator).to(device, dtype) * 3
    threshold = 0.5

    def eager():
        confidence, prediction = torch.softmax(logits.float(), dim=1).max(dim=1)
        leaves = confidence >= threshold
        order = torch.cat([torch.nonzero(~leaves).flatten(), torch.nonzero(leaves).flatten()])
        return confidence, prediction, order, (~leaves).sum()

    candidates = {"eager": eager}
    for backend in backends_here(device, "exit_partition"):
        candidates[backend] = lambda backend=backend: exit_partition(logits, threshold, backend=backend)
    yield {"classes": classes}, 5 * logits.numel(), _nbytes(logits) + batch * 20, candidates


CASES = {"fused_conv2d": fused_conv2d_cases, "upsample_concat": upsample_concat_cases,
         "batch_norm_relu": batch_norm_relu_cases, "batch_norm_relu_backward": batch_norm_relu_backward_cases,
         "gather_rows": gather_rows_cases, "exit_partition": exit_partition_cases}


# ---------------------------------------------------------------------------
# Checking and timing
# ---------------------------------------------------------------------------


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in _flatten(item)] if isinstance(result, (list, tuple)) else []


def relative_error(got, expected) -> float:
    errors = []
    for a, b in zip(_flatten(got), _flatten(expected)):
        if not a.is_floating_point():
            errors.append(0.0 if torch.equal(a.cpu(), b.cpu()) else float("inf"))
            continue
        a, b = a.double(), b.double()
        errors.append(((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return max(errors) if errors else 0.0


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    # eager's fp32 convolutions may use TF32 on a GPU (cuDNN's default): ~3e-4 apart from fp32.
    if dtype == torch.float32:
        return 1e-3 if device.type == "cuda" else 1e-5
    return 2e-2


def measure(fn, device: torch.device, repeats: int, min_run_time: float) -> tuple[float, float | None]:
    """(seconds per call as a caller sees them, the GPU's own seconds per call or None).

    The first is the median of ``repeats`` samples of back-to-back calls (CUDA events around them),
    host overhead included: at RANet's sizes a launch can cost more than its kernel. The second
    replays the same call captured in a CUDA graph, which removes the host from the measurement;
    None where the call cannot be captured (or on a CPU).
    """
    if device.type != "cuda":
        return median_seconds(fn, repeats, min_run_time), None
    for _ in range(3):
        fn()
    wall = _event_median(fn, repeats, min_run_time)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        return wall, _event_median(graph.replay, repeats, min_run_time)
    except Exception:  # capture is not possible for every candidate (host syncs, autograd's threads)
        torch.cuda.synchronize()
        return wall, None


def _event_median(fn, repeats: int, min_run_time: float) -> float:
    cuda = torch.device("cuda")
    calls = max(1, min(500, int(min_run_time / max(seconds_per_call(fn, 1, cuda), 1e-7))))
    return statistics.median(seconds_per_call(fn, calls, cuda) for _ in range(repeats))


def run_op(op, configs, batch, device, dtype, layout, ceilings, options) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for config in configs:
        cases = list(CASES[op](config, batch, device, dtype, layout, generator))
        # The heaviest cases by bytes: where a kernel's speed matters, and a few small ones are
        # dominated by launch latency anyway.
        cases.sort(key=lambda case: -case[2])
        for shape, flops, nbytes, candidates in cases[: options.max_shapes]:
            floor = floor_seconds(flops, nbytes, ceilings, dtype)
            expected = candidates["eager"]()
            row = {"op": op, "config": config, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                   "layout": layout, "shape": shape, "flops": flops, "min_bytes": nbytes, "floor_s": floor,
                   "seconds": {}, "device_seconds": {}, "x_floor": {}, "relative_error": {}, "errors": {}}
            for name, fn in candidates.items():
                try:
                    error = relative_error(fn(), expected)
                    row["relative_error"][name] = error
                    if not error <= tolerance(dtype, device):
                        row["errors"][name] = f"relative error {error:.3g} above {tolerance(dtype, device):g}"
                        continue
                    seconds, device_seconds = measure(fn, device, options.repeats, options.min_run_time)
                except Exception as error:  # one failing backend must not hide the others' figures
                    row["errors"][name] = f"{type(error).__name__}: {error}"[:500]
                    continue
                row["seconds"][name] = seconds
                row["device_seconds"][name] = device_seconds
                # Against the floor: the GPU's own time where a graph replay measured it.
                row["x_floor"][name] = (device_seconds or seconds) / floor if floor > 0 else None
            fastest = min(row["seconds"], key=row["seconds"].get) if row["seconds"] else None
            row["fastest"] = fastest
            row["fastest_fused_vs_eager"] = _best_fused_ratio(row)
            rows.append(row)
            print_row(row)
    return rows


def _best_fused_ratio(row) -> float | None:
    fused = [s for name, s in row["seconds"].items() if name not in ("eager", "reference")]
    if not fused or "eager" not in row["seconds"]:
        return None
    return row["seconds"]["eager"] / min(fused)


def print_row(row) -> None:
    times = "  ".join(f"{name} {seconds * 1e6:.1f}us/{(row['device_seconds'][name] or float('nan')) * 1e6:.1f}us "
                      f"({row['x_floor'][name]:.1f}x)" for name, seconds in row["seconds"].items()
                      if row["x_floor"][name] is not None)
    failed = "  ".join(f"{name} FAILED" for name in row["errors"])
    print(f"{row['op']:<24} {row['config']:<10} {row['dtype']:<8} floor {row['floor_s'] * 1e6:8.1f}us  "
          f"{times}  {failed}", flush=True)


def summarise(rows) -> dict:
    summary = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["op"] == op):
            selected = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            names = dict.fromkeys(name for r in selected for name in r["seconds"])
            summary[f"{op} {dtype}"] = {
                "cases": len(selected),
                "failures": sum(len(r["errors"]) for r in selected),
                "geomean_x_floor": {name: geometric_mean([r["x_floor"][name] for r in selected
                                                          if r["x_floor"].get(name)]) for name in names},
                "geomean_vs_eager": {name: geometric_mean([r["seconds"]["eager"] / r["seconds"][name]
                                                           for r in selected if name in r["seconds"]
                                                           and "eager" in r["seconds"]]) for name in names},
                "geomean_device_vs_eager": {
                    name: geometric_mean([r["device_seconds"]["eager"] / r["device_seconds"][name] for r in selected
                                          if r["device_seconds"].get(name) and r["device_seconds"].get("eager")])
                    for name in names},
                "fastest_counts": {name: sum(1 for r in selected if r["fastest"] == name) for name in names},
            }
    return summary


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--configs", nargs="+", default=["cifar-c1", "cifar-c3", "imagenet-1"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="channels_last")
    parser.add_argument("--max-shapes", type=int, default=6, help="the heaviest this many shapes per config")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--small-ceilings", action="store_true", help="measure the ceilings on small sizes (CPU)")
    parser.add_argument("--json", help="write the results (with the environment) to this file")
    options = parser.parse_args(argv)
    device = torch.device(options.device)
    begin = time.perf_counter()
    ceilings = measure_ceilings(device, options.repeats, options.min_run_time, options.small_ceilings)
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, {ceilings['matmul_dtype']} matmul "
          f"{ceilings['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for dtype_name in options.dtypes:
        for op in options.ops:
            rows += run_op(op, options.configs, options.batch, device, DTYPES[dtype_name], options.layout,
                           ceilings, options)
            # Written after every op, so a run stopped by a deadline keeps what it measured.
            result = {**provenance("op_backends"), "complete": False,
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "options": vars(options), "ceilings": ceilings,
                      "summary": summarise(rows), "rows": rows, "wall_s": time.perf_counter() - begin}
            write_json(options.json, result)
    result["complete"] = True
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
