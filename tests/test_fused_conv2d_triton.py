"""The Triton backend of fused_conv2d (kernels/fused_conv2d.py) against the float64 reference.

The checks are tests/test_fused_conv2d.py's, run with backend="triton". On CPU they run under
the Triton interpreter in a subprocess: Triton fixes interpreter mode when a kernel module is
imported, so setting TRITON_INTERPRET=1 here would depend on import order and switch every other
test's kernels too. The subprocess runs every check once and reports each one's outcome; on a GPU
the same checks run in process (compiled kernels, bfloat16 dots on tensor cores).
"""

import torch

import test_fused_conv2d as checks
from cuda_testing import exact_float32, numerics_state, requires_cuda_gpu, restore_numerics
from op_testing import compile_recording_ops
from triton_interpreter import each_check_on_gpu, each_check_under_interpreter, int64_indices, on_triton


def _forward_checks():
    # Every case in float32 and float64; the half types on a few (the interpreter is slow).
    named = {}
    for name, case in checks.CASES.items():
        for dtype in (torch.float32, torch.float64):
            named[f"forward-{name}-{dtype}"] = (checks.check_forward, case, dtype)
    for name in ("3x3-down-odd", "1x1-prologue", "wide"):
        for dtype in (torch.float16, torch.bfloat16):
            named[f"forward-{name}-{dtype}"] = (checks.check_forward, checks.CASES[name], dtype)
    return named


def named_checks():
    """name -> (check function, extra arguments after (backend, device))."""
    named = _forward_checks()
    for layout in checks.INPUT_LAYOUTS:
        named[f"input-{layout}"] = (checks.check_input_layout, layout, "3x3-prologue-down")
    named["input-prefix_nchw-1x1"] = (checks.check_input_layout, "prefix_nchw", "1x1-bottleneck")
    for layout in checks.OUT_LAYOUTS:
        named[f"out-{layout}"] = (checks.check_out_slice, layout, "3x3-down-odd")
    named["dense-block-float32"] = (checks.check_dense_block_in_place, torch.float32)
    named["dense-block-bfloat16"] = (checks.check_dense_block_in_place, torch.bfloat16)
    for batch in (0, 1):
        named[f"batch-{batch}"] = (checks.check_small_batches, batch)
    named["gradients"] = (checks.check_gradients, "3x3-prologue-down")
    named["gradcheck"] = (checks.check_gradcheck,)
    named["strided-vectors"] = (checks.check_strided_vectors,)
    # Every activation in the prologue and the epilogue: float64 catches a constant rounded to
    # float32 on its way into the kernel (the slope, GELU's 1/sqrt(2)), float16 the half path.
    for name in checks.ACTIVATIONS:
        for dtype in (torch.float32, torch.float64, torch.float16):
            named[f"activation-{name}-{dtype}"] = (checks.check_activation, name, dtype)
    named["opcheck"] = (check_opcheck,)
    named["compile-fullgraph"] = (check_compile_fullgraph,)
    named["forward-multi-tile-bfloat16"] = (checks.check_forward, checks.CASES["multi-tile"], torch.bfloat16)
    # Stride 2 on a grid of two programs along both axes, ragged (1152 output pixels, 130 channels,
    # 81 reductions): float32/float64 forward are in _forward_checks; float16 and the float64 backward.
    named["forward-multi-tile-stride2-float16"] = (checks.check_forward, checks.CASES["multi-tile-stride2"],
                                                   torch.float16)
    named["gradients-multi-tile-stride2"] = (checks.check_gradients, "multi-tile-stride2")
    # The statistics epilogue: atomic adds from every program of multi-tile grids, stride 2, N = 1.
    for case_name in checks.STATISTICS_CASES:
        named[f"statistics-{case_name}-float32"] = (checks.check_statistics, case_name, torch.float32)
    for dtype in (torch.float64, torch.float16):
        named[f"statistics-multi-tile-{dtype}"] = (checks.check_statistics, "multi-tile", dtype)
    named["statistics-without-out"] = (checks.check_statistics, "3x3-down-odd", torch.float32, False)
    named["statistics-batch-0"] = (checks.check_empty_batch_statistics,)
    named["out-slice-multi-tile"] = (checks.check_out_slice, "slice", "multi-tile")
    # The 64-bit index variant, forced on small tensors.
    int64_checks = {
        "forward-3x3-down-odd": (checks.check_forward, checks.CASES["3x3-down-odd"], torch.float32),
        "input-prefix_channels_last": (checks.check_input_layout, "prefix_channels_last", "3x3-prologue-down"),
        "out-strided": (checks.check_out_slice, "strided", "3x3-down-odd"),
        "out-slice-multi-tile-bfloat16": (checks.check_out_slice, "channels_last", "multi-tile", torch.bfloat16),
    }
    for name, (function, *arguments) in int64_checks.items():
        named[f"int64-index-{name}"] = (check_with_int64_indices, function, *arguments)
    return named


def check_with_int64_indices(backend, device, function, *arguments):
    from ranet_fast.kernels import fused_conv2d as kernels

    with int64_indices(kernels, "_fused_conv2d_kernel"):
        function(backend, device, *arguments)


def check_opcheck(backend, device):
    functional, out_arguments = checks.opcheck_arguments(device)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_triton.default, functional)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_triton_out.default, out_arguments)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_triton_stats_out.default,
                          checks.stats_opcheck_arguments(device))


def check_compile_fullgraph(backend, device):
    from ranet_fast.ops import fused_conv2d

    def layer(x, weight, scale):
        return fused_conv2d(x, weight, padding=1, epilogue_scale=scale, activation="relu", backend=backend) * 2

    x, weight, vectors = checks.CASES["3x3-normal"].tensors(torch.float32, device, 8)
    compiled, graph_ops = compile_recording_ops(layer)
    assert torch.equal(compiled(x, weight, vectors["epilogue_scale"]), layer(x, weight, vectors["epilogue_scale"]))
    assert "ranet_fast.fused_conv2d_triton" in graph_ops, graph_ops


def triton_interpreter_checks():
    return on_triton(named_checks())


def _in_exact_float32(check):
    def run(device):
        # The checks compare float32 with the float64 reference at float32 tolerances; on a GPU the
        # kernel's float32 dots follow cuDNN's TF32 flag (on by default), so it is turned off here.
        with exact_float32():
            check(device)

    return run


def gpu_checks():
    return {name: _in_exact_float32(check) for name, check in triton_interpreter_checks().items()}


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)
test_triton_on_gpu = each_check_on_gpu(gpu_checks)


def _tf32_convolutions():
    if hasattr(torch.backends.cudnn, "conv"):
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True


@requires_cuda_gpu
def test_float32_dots_follow_the_cudnn_tf32_flag():
    """TF32 products where eager convolutions may use them, IEEE float32 where they may not."""
    from ranet_fast.kernels.fused_conv2d import float32_dots_in_tf32
    from ranet_fast.ops import fused_conv2d

    case = checks.Case(2, 64, 20, 20, 48, 3, padding=1, prologue=True)
    x, weight, vectors = case.tensors(torch.float32, "cuda", 123)
    reference = checks.expected(x, weight, vectors, case.options())
    with exact_float32():
        assert not float32_dots_in_tf32()
        ieee = fused_conv2d(x, weight, **vectors, **case.options(), backend="triton")
    state = numerics_state()
    try:
        _tf32_convolutions()
        assert float32_dots_in_tf32()
        tf32 = fused_conv2d(x, weight, **vectors, **case.options(), backend="triton")
    finally:
        restore_numerics(state)
    ieee_error = (ieee.double().cpu() - reference).abs().max().item()
    tf32_error = (tf32.double().cpu() - reference).abs().max().item()
    checks.assert_close(ieee, reference, torch.float32)
    # TF32 keeps 10 mantissa bits: about 2**-11 relative per product, over 576 products per output.
    torch.testing.assert_close(tf32.double().cpu(), reference, rtol=1e-2, atol=1e-2)
    assert tf32_error > 10 * ieee_error, (tf32_error, ieee_error)
