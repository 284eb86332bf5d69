"""The Triton backend of the batch-norm training ops (kernels/batch_norm_relu.py) against float64.

The checks are tests/test_batch_norm_relu.py's, run with backend="triton". On CPU they run under
the Triton interpreter in a subprocess: Triton fixes interpreter mode when a kernel module is
imported, so setting TRITON_INTERPRET=1 here would depend on import order and switch every other
test's kernels too. The subprocess runs every check once and reports each one's outcome; on a GPU
the same checks run in process (compiled kernels).
"""

import torch

import test_batch_norm_relu as checks
from triton_interpreter import each_check_on_gpu, each_check_under_interpreter, int64_indices, on_triton


def named_checks():
    """name -> (check function, extra arguments after (backend, device))."""
    named = {}
    for name, shape in checks.SHAPES.items():
        for dtype in (torch.float32, torch.float64):
            named[f"stats-{name}-{dtype}"] = (checks.check_stats, shape, dtype)
            named[f"forward-{name}-{dtype}"] = (checks.check_forward, shape, dtype)
            named[f"backward-{name}-{dtype}"] = (checks.check_backward, shape, dtype)
    for dtype in (torch.float16, torch.bfloat16):
        for name in ("odd", "wide"):
            named[f"stats-{name}-{dtype}"] = (checks.check_stats, checks.SHAPES[name], dtype)
            named[f"forward-{name}-{dtype}"] = (checks.check_forward, checks.SHAPES[name], dtype)
            named[f"backward-{name}-{dtype}"] = (checks.check_backward, checks.SHAPES[name], dtype)
    named["forward-identity"] = (checks.check_forward, checks.SHAPES["ranet-16"], torch.float32, False)
    named["backward-identity"] = (checks.check_backward, checks.SHAPES["ranet-16"], torch.float32, False)
    for relu in (True, False):
        named[f"autograd-relu-{relu}"] = (checks.check_matches_autograd, relu)
    for layout in checks.INPUT_LAYOUTS:
        named[f"input-{layout}"] = (checks.check_input_layout, layout, "slice_nchw")
    named["input-nchw-grad-slice_channels_last"] = (checks.check_input_layout, "nchw", "slice_channels_last")
    for layout in checks.OUT_LAYOUTS:
        named[f"out-{layout}"] = (checks.check_out_slice, layout)
    named["out-bfloat16"] = (checks.check_out_slice, "channels_last", torch.bfloat16)
    for batch in (0, 1):
        named[f"batch-{batch}"] = (checks.check_small_batches, batch)
    named["large-mean"] = (checks.check_stats_keep_a_small_variance_under_a_large_mean,)
    named["relu-mask-at-zero"] = (checks.check_relu_mask_at_zero,)
    named["deterministic"] = (checks.check_deterministic,)
    named["refuses-grad"] = (checks.check_refuses_grad,)
    named["opcheck"] = (check_opcheck,)
    named["out-multi-tile"] = (checks.check_out_slice, "channels_last", torch.float32, True, "multi-tile")
    # The 64-bit index variant of every kernel that has one, forced on small tensors.
    int64_checks = {
        "stats-multi-tile": (checks.check_stats, checks.SHAPES["multi-tile"], torch.float32),
        "backward-multi-tile": (checks.check_backward, checks.SHAPES["multi-tile"], torch.float64),
        "backward-odd-bfloat16": (checks.check_backward, checks.SHAPES["odd"], torch.bfloat16),
        "out-multi-tile": (checks.check_out_slice, "slice", torch.float32, False, "multi-tile"),
        "out-channels_last": (checks.check_out_slice, "channels_last", torch.float64),
    }
    for name, (function, *arguments) in int64_checks.items():
        named[f"int64-index-{name}"] = (check_with_int64_indices, function, *arguments)
    return named


def check_with_int64_indices(backend, device, function, *arguments):
    from ranet_fast.kernels import batch_norm_relu as kernels

    with int64_indices(kernels, "_moments_partials_kernel", "_forward_kernel", "_grad_partials_kernel",
                       "_grad_x_kernel"):
        function(backend, device, *arguments)


def check_opcheck(backend, device):
    arguments = checks.opcheck_arguments(device)
    ops = torch.ops.ranet_fast
    torch.library.opcheck(ops.batch_norm_stats_triton.default, arguments["stats"])
    torch.library.opcheck(ops.batch_norm_relu_triton.default, arguments["forward"])
    torch.library.opcheck(ops.batch_norm_relu_triton_out.default, arguments["forward_out"])
    torch.library.opcheck(ops.batch_norm_relu_backward_triton.default, arguments["backward"])


def triton_interpreter_checks():
    return on_triton(named_checks())


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)
test_triton_on_gpu = each_check_on_gpu(triton_interpreter_checks)
