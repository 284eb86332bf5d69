"""gather_rows vs a per-tensor index_select loop on the live tensors of a RANet.

    python -m benchmarks gather_rows --configs cifar-c1 cifar-c3 --batch 64 1024 \
        --device cuda --dtype bf16 --json benchmarks/results/gather_rows-h100.json

The tensors stand for the ones early-exit inference compacts after an exit:
the first layer's per-scale features and every block's output, recorded from
an eager forward of the model with hooks, at the chosen batch size, plus the
int64 positions vector. (The per-layer outputs that fusion blocks also read
are left out: in the official dense blocks each is a channel prefix of the
next, and counting all of them would multiply the bytes several-fold.) The index keeps ``--keep`` of
the samples in a random order (the engine's ``order[:n]``), passed with
check_index=False as the engine does.

Contenders, each the median of ``--repeats`` measurements of
torch.utils.benchmark (which synchronises CUDA):
  gather_rows   one call for all tensors (the automatic backend);
  triton        the Triton backend (CUDA only);
  loop          ``[t.index_select(0, index) for t in tensors]``;
  copy          one ``copy_`` of a buffer of the same number of bytes: the
                bandwidth ceiling. ``copy fraction`` = copy time / gather_rows
                time, the share of plain-copy bandwidth the gather reaches.
The project's GPU targets (>= 5x the loop, >= 70 % of copy bandwidth at large
sizes) are checked here, never by a unit test.
"""

from __future__ import annotations

import torch

from ranet_fast import _extension
from ranet_fast.ops import gather_rows

from .common import (DTYPES, MEMORY_FORMATS, add_model_arguments, add_run_arguments, benchmark_parser,
                     forward_with_hooks, median_seconds, provenance, write_json)


def live_shapes(config: str) -> list[tuple[int, ...]]:
    """Per-sample shapes [C, H, W] of the first layer's features and every block's output in ``config``."""
    shapes: list[tuple[int, ...]] = []

    def record(tensors):
        shapes.extend(tuple(tensor.shape[1:]) for tensor in tensors)

    def first_layer_hook(module, inputs, output):
        record(output)

    def block_hook(module, inputs, output):
        record(output[:1])

    forward_with_hooks(config, lambda model: [(model.FirstLayer, first_layer_hook)]
                       + [(block, block_hook) for flow in model.scale_flows for block in flow])
    return shapes


def index_select_loop(tensors, index):
    return [tensor.index_select(0, index) for tensor in tensors]


def run_case(config, batch, device, dtype, layout, keep, repeats, min_run_time, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn((batch, *shape), generator=generator).to(device=device, dtype=dtype).contiguous(
            memory_format=MEMORY_FORMATS[layout])
        for shape in live_shapes(config)
    ]
    tensors.append(torch.arange(batch, device=device))
    kept = max(1, round(keep * batch))
    index = torch.randperm(batch, generator=generator)[:kept].to(device)
    gathered_bytes = sum(tensor[0].numel() * tensor.element_size() for tensor in tensors) * kept
    source = torch.randint(0, 256, (gathered_bytes,), generator=generator, dtype=torch.uint8).to(device)
    destination = torch.empty_like(source)

    contenders = {"gather_rows": lambda: gather_rows(tensors, index, check_index=False)}
    if torch.device(device).type == "cuda" and _extension.backend_status("triton", device, "gather_rows")[0]:
        contenders["triton"] = lambda: gather_rows(tensors, index, check_index=False, backend="triton")
    contenders["loop"] = lambda: index_select_loop(tensors, index)
    contenders["copy"] = lambda: destination.copy_(source)

    for got, want in zip(gather_rows(tensors, index, check_index=False), index_select_loop(tensors, index)):
        assert torch.equal(got, want), "gather_rows differs from index_select"  # a fast wrong answer is no result
    row = {"config": config, "batch": batch, "kept": kept, "tensors": len(tensors),
           "gathered_mbytes": gathered_bytes / 2**20, "seconds": {}}
    for name, fn in contenders.items():
        fn()  # warm-up (Triton compilation, allocator)
        row["seconds"][name] = median_seconds(fn, repeats, min_run_time)
    seconds = row["seconds"]
    row["speedup_vs_loop"] = seconds["loop"] / seconds["gather_rows"]
    row["copy_fraction"] = seconds["copy"] / seconds["gather_rows"]
    # Bytes read plus bytes written, per second.
    row["gather_gbytes_per_s"] = 2 * gathered_bytes / seconds["gather_rows"] / 1e9
    row["copy_gbytes_per_s"] = 2 * gathered_bytes / seconds["copy"] / 1e9
    return row


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    add_model_arguments(parser, configs=["cifar-c1", "cifar-c3"], batch=[64, 1024], compile_option=False)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of the samples kept")
    add_run_arguments(parser)
    options = parser.parse_args(argv)

    dtype = DTYPES[options.dtype]
    rows = []
    print(f"{'config':<9} {'batch':>5} {'kept':>5} {'tensors':>7} {'MiB':>8} {'gather_rows':>12} {'loop':>12} "
          f"{'copy':>12} {'vs loop':>8} {'copy fraction':>13} {'GB/s':>7}")
    for config in options.configs:
        for batch in options.batch:
            row = run_case(config, batch, options.device, dtype, options.layout, options.keep, options.repeats,
                           options.min_run_time)
            rows.append(row)
            seconds = row["seconds"]
            print(f"{config:<9} {batch:>5} {row['kept']:>5} {row['tensors']:>7} {row['gathered_mbytes']:>8.2f} "
                  f"{seconds['gather_rows'] * 1e6:>10.1f}us {seconds['loop'] * 1e6:>10.1f}us "
                  f"{seconds['copy'] * 1e6:>10.1f}us {row['speedup_vs_loop']:>7.2f}x {row['copy_fraction']:>12.1%} "
                  f"{row['gather_gbytes_per_s']:>7.1f}"
                  + (f"  triton {seconds['triton'] * 1e6:.1f}us" if "triton" in seconds else ""), flush=True)
    result = {**provenance("gather_rows"), "device": options.device, "dtype": options.dtype, "layout": options.layout,
              "keep": options.keep, "rows": rows}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
