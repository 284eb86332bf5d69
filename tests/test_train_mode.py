"""Train-mode fast layers (ranet_fast/nn/train_mode.py) against the eager official layers.

Outputs, every prefix output of a dense block, gradients of the input and of every parameter, and
the BN running statistics (two steps, so the first update is used), in float64 to 1e-10; in
float32 against the float64 result of the eager layers, within a bound measured from eager float32's
own error (``assert_as_accurate_as_eager``); on NCHW, channels_last and channel-slice inputs; on each
CPU-side backend. Also:
the train path really runs (its autograd nodes are in the graph), no torch.cat in forward or
backward, what is saved for backward (the buffer and each conv's pre-BN output, never a
normalised activation), gradcheck, and the cases that must fall back to the official forward.
"""

import copy

import pytest
import torch
import torch.nn as nn

from ranet_fast import _extension
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.ranet import ConvBasic, ConvBN, ConvNormal, ConvUpNormal, _BlockNormal
from ranet_fast.nn import convert, train_mode
from triton_interpreter import run_script_on_triton_backend
from cuda_testing import NO_CUDA_GPU
from model_testing import randomize_bn

needs_extension = pytest.mark.skipif(not _extension.extension_loaded(), reason="ranet_fast._C is not built")
BACKENDS = [pytest.param("cpu", marks=needs_extension), "reference"]


def pair(module: nn.Module, dtype=torch.float64, seed=0):
    module = module.to(dtype)
    randomize_bn(module, seed)
    return module.train(), convert(copy.deepcopy(module)).train()


def make_input(shape, dtype, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    if layout == "slice":  # a channel slice of a bigger tensor
        full = torch.randn(shape[0], shape[1] + 3, *shape[2:], generator=generator, dtype=torch.float64)
        return (full[:, 1:1 + shape[1]] + 0.3).to(dtype)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) + 0.3).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_close(ours, theirs, dtype, what):
    rtol = tolerance(dtype)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * max(theirs.abs().max().item(), 1.0),
                               msg=lambda m: f"{what}: {m}")


# The float32 bound is measured, not chosen to fit the fast path: the eager official layers run in
# float64 on the same float32 parameters and inputs give the exact result to ~1e-16, and eager
# float32's distance from it is what float32 rounding costs on this computation. The fast path does
# the same arithmetic in another order (fused kernels, one-pass statistics), so its error must be of
# that size: at most ROUNDING_ORDER_FACTOR times eager's, and it is never asked for less than a few
# float32 ulps of the values' scale (eager may land on the exact value by chance).
ROUNDING_ORDER_FACTOR = 8
FLOAT32_ULPS_FLOOR = 4


def assert_as_accurate_as_eager(ours, eager, exact, what):
    """``ours`` (fast, float32) is as close to ``exact`` (eager, float64) as ``eager`` (float32) is."""
    exact = exact.detach().double()
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    eager_error = (eager.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    our_error = (ours.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    floor = FLOAT32_ULPS_FLOOR * torch.finfo(torch.float32).eps * scale
    bound = ROUNDING_ORDER_FACTOR * max(eager_error, floor)
    assert ours.shape == exact.shape and our_error <= bound, (
        f"{what}: fast float32 is {our_error:.3g} from the float64 result, eager float32 {eager_error:.3g} "
        f"(bound {bound:.3g})")


def assert_same_state(fast: nn.Module, eager: nn.Module, dtype, exact: nn.Module | None = None):
    """Parameter gradients and buffers of ``fast`` against ``eager``: for float32, against the float64
    twin ``exact`` of the eager model within eager's own float32 error."""

    def check(ours, theirs, name):
        if exact is None:
            assert_close(ours, theirs, dtype, name)
        else:
            assert_as_accurate_as_eager(ours, theirs, exact_tensors[name], name)

    exact_tensors = {} if exact is None else {
        **{f"grad of {name}": p.grad for name, p in exact.named_parameters()}, **dict(exact.named_buffers())}
    fast_parameters = dict(fast.named_parameters())
    for name, p in eager.named_parameters():
        assert fast_parameters[name].grad is not None, name
        check(fast_parameters[name].grad, p.grad, f"grad of {name}")
    fast_buffers = dict(fast.named_buffers())
    for name, b in eager.named_buffers():
        if b.dtype == torch.int64:
            assert torch.equal(fast_buffers[name], b), name
        else:
            check(fast_buffers[name], b, name)


def grad_fn_names(tensor: torch.Tensor) -> set[str]:
    """Names of every autograd node reachable from tensor."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def dense_block(dtype=torch.float64, momentum=0.1):
    torch.manual_seed(1)
    block = _BlockNormal(3, 5, 4, 0.5, True, 2)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return pair(block, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_dense_block_train_equals_eager(monkeypatch, backend, dtype, layout, momentum):
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    eager, fast = dense_block(dtype, momentum)
    # float32 is held to the eager layers' float64 result on the same values (see ROUNDING_ORDER_FACTOR).
    exact = copy.deepcopy(eager).double() if dtype == torch.float32 else None

    def compare(ours, theirs, exact_value, what):
        if exact is None:
            assert_close(ours, theirs, dtype, what)
        else:
            assert_as_accurate_as_eager(ours, theirs, exact_value, what)

    for step in range(2):
        x = make_input((3, 5, 7, 6), dtype, layout, seed=step)
        x_eager, x_fast = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        x_exact = x.detach().double().requires_grad_()
        (y_eager, outputs_eager), (y_fast, outputs_fast) = eager(x_eager), fast(x_fast)
        y_exact, outputs_exact = exact(x_exact) if exact is not None else (y_eager, outputs_eager)
        assert "DenseBlockFunctionBackward" in grad_fn_names(y_fast)
        compare(y_fast, y_eager, y_exact, "output")
        assert len(outputs_fast) == len(outputs_eager)
        for k, (ours, theirs, exact_output) in enumerate(zip(outputs_fast, outputs_eager, outputs_exact)):
            compare(ours, theirs, exact_output, f"outputs[{k}]")
        if layout == "channels_last":
            assert outputs_fast[-1].is_contiguous(memory_format=torch.channels_last)
        # The next flow's fusion blocks read the prefix outputs: give each its own gradient.
        weights = [torch.randn_like(o) for o in outputs_eager[1:]]
        runs = [(y_eager, outputs_eager), (y_fast, outputs_fast)]
        for y, outputs in runs + ([(y_exact, outputs_exact)] if exact is not None else []):
            loss = y.square().sum() + sum((w.to(y.dtype) * o).sum() for w, o in zip(weights, outputs[1:]))
            loss.backward()
        compare(x_fast.grad, x_eager.grad, x_exact.grad, "grad of x")
    assert_same_state(fast, eager, dtype, exact)


def test_dense_block_train_without_cat(monkeypatch):
    eager, fast = dense_block()
    x = make_input((2, 5, 6, 6), torch.float64, "nchw", 0).requires_grad_()

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called in a train-mode fast layer")

    monkeypatch.setattr(torch, "cat", no_cat)
    y, outputs = fast(x)
    (y.sum() + outputs[1].sum()).backward()
    buffer = outputs[-1]
    assert all(o.data_ptr() == buffer.data_ptr() for o in outputs[1:])
    assert x.grad is not None


def saved_storages(fn):
    """({storage pointer: (bytes, shape of a tensor saved on it)}, fn()) for what autograd saves while fn() runs."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return storages, result


def test_dense_block_saves_only_the_buffer_and_pre_bn_outputs():
    """What backward keeps: the block's buffer, each conv's pre-BN output and per-channel
    statistics and parameters; no normalised activation, no per-layer concatenation."""
    _, fast = dense_block()
    batch, height, width = 4, 8, 8
    x = make_input((batch, 5, height, width), torch.float64, "nchw", 0).requires_grad_()
    storages, (y, outputs) = saved_storages(lambda: fast(x))
    activations = sorted(shape for _, shape in storages.values() if len(shape) == 4 and shape[0] == batch and shape[2:] == (height, width))
    expected = [(batch, outputs[-1].shape[1], height, width)]  # the buffer, once
    for layer in fast.layers:
        squeeze, spatial = layer.conv_normal.net[0], layer.conv_normal.net[3]
        expected += [(batch, squeeze.out_channels, height, width), (batch, spatial.out_channels, height, width)]
    # The transition reads the buffer (counted) and keeps its own pre-BN output.
    expected.append((batch, fast.trans.net[0].out_channels, height, width))
    assert activations == sorted(expected)
    assert outputs[-1].untyped_storage().data_ptr() in storages


def test_dense_block_saves_less_than_eager():
    eager, fast = dense_block()
    x = make_input((4, 5, 8, 8), torch.float64, "nchw", 0).requires_grad_()
    eager_bytes = sum(size for size, _ in saved_storages(lambda: eager(x))[0].values())
    fast_bytes = sum(size for size, _ in saved_storages(lambda: fast(x))[0].values())
    assert fast_bytes < 0.75 * eager_bytes, (fast_bytes, eager_bytes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fusion_layer_train_equals_eager(monkeypatch, backend, down, layout):
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    torch.manual_seed(2)
    eager, fast = pair(ConvUpNormal(6, 5, 4, True, 2, 1, 0.25, down))
    for step in range(2):
        x_low = make_input((2, 5, 4, 5), torch.float64, layout, seed=10 + step)
        x_cur = make_input((2, 6, 8, 9), torch.float64, layout, seed=20 + step)
        inputs_eager = [t.detach().clone().requires_grad_() for t in (x_low, x_cur)]
        inputs_fast = [t.detach().clone().requires_grad_() for t in (x_low, x_cur)]
        y_eager, y_fast = eager(inputs_eager), fast(inputs_fast)
        assert "FusionLayerFunctionBackward" in grad_fn_names(y_fast)
        assert_close(y_fast, y_eager, torch.float64, "output")
        weight = torch.randn_like(y_eager)
        (weight * y_eager).sum().backward()
        (weight * y_fast).sum().backward()
        for name, a, b in (("x_low", *[t[0] for t in (inputs_fast, inputs_eager)]),
                           ("x_cur", *[t[1] for t in (inputs_fast, inputs_eager)])):
            assert_close(a.grad, b.grad, torch.float64, f"grad of {name}")
    assert_same_state(fast, eager, torch.float64)


@pytest.mark.parametrize("module", ["conv_basic", "conv_bn", "conv_normal", "conv_basic_stride2"])
def test_single_layers_train_equal_eager(module):
    torch.manual_seed(3)
    layer = {
        "conv_basic": lambda: ConvBasic(5, 7),
        "conv_basic_stride2": lambda: ConvBasic(5, 7, kernel=3, stride=2, padding=1),
        "conv_bn": lambda: ConvBN(5, 4, "down", True, 2),
        "conv_normal": lambda: ConvNormal(5, 4, True, 2),
    }[module]()
    eager, fast = pair(layer)
    for step in range(2):
        x = make_input((3, 5, 9, 8), torch.float64, "nchw", step)
        x_eager, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y_fast = eager(x_eager), fast(x_fast)
        assert {"ChainFunctionBackward", "DenseBlockFunctionBackward"} & grad_fn_names(y_fast)
        assert_close(y_fast, y_eager, torch.float64, "output")
        weight = torch.randn_like(y_eager)
        (weight * y_eager).sum().backward()
        (weight * y_fast).sum().backward()
        assert_close(x_fast.grad, x_eager.grad, torch.float64, "grad of x")
    assert_same_state(fast, eager, torch.float64)


def test_chain_with_conv_bias_and_gradcheck():
    """A biased conv (generic conv -> BN -> ReLU) and torch.autograd.gradcheck of the Functions."""
    torch.manual_seed(5)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1).double(), nn.BatchNorm2d(4).double()
    randomize_bn(bn)
    plan = train_mode.ChainPlan((conv, ), (bn, ))
    x = make_input((2, 3, 5, 4), torch.float64, "nchw", 0).requires_grad_()
    eager = torch.relu(bn(conv(x)))
    ours = train_mode.run_chain(plan, x)
    torch.testing.assert_close(ours, eager, rtol=1e-12, atol=1e-12)
    params = plan.parameters()
    assert torch.autograd.gradcheck(lambda x, *p: train_mode.ChainFunction.apply(x, plan, *p), (x, *params))
    plans = tuple(train_mode.ChainPlan((nn.Conv2d(3 + 2 * i, 2, 3, padding=1, bias=False).double(),),
                                       (nn.BatchNorm2d(2).double(),)) for i in range(2))
    block_params = [p for plan in plans for p in plan.parameters()]

    def block(x, *p):
        buffer, *views = train_mode.DenseBlockFunction.apply(x, plans, *p)
        return buffer, *views

    assert torch.autograd.gradcheck(block, (x, *block_params))


def test_falls_back_to_the_official_forward_where_it_must():
    eager, fast = dense_block()
    # One value per channel: eager BatchNorm's own error.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fast(torch.randn(1, 5, 1, 1, dtype=torch.float64))
    # official_forward takes the official path (autocast takes the fast one: tests/test_autocast.py).
    from ranet_fast.nn.common import official_forward
    x = make_input((2, 5, 6, 6), torch.float64, "nchw", 0).requires_grad_()
    with official_forward():
        y, _ = fast(x)
    assert "DenseBlockFunctionBackward" not in grad_fn_names(y)
    # The pre-activation ConvBN trains through the official forward, bit for bit.
    torch.manual_seed(6)
    eager_pre, fast_pre = pair(ConvBN(5, 4, "normal", False, 2), torch.float32)
    x = torch.randn(3, 5, 6, 6)
    assert torch.equal(fast_pre(x), eager_pre(x))


def test_converted_ranet_train_step_float32():
    """A whole converted C-1 in float32 (NCHW and channels_last): logits and gradients, against the
    eager model's float64 result within eager float32's own error (see ROUNDING_ORDER_FACTOR)."""
    torch.manual_seed(7)
    eager = RANet(ranet_config("cifar-c1", nChannels=8, growthRate=4, step=2))
    randomize_bn(eager)
    fast = convert(copy.deepcopy(eager))
    exact = copy.deepcopy(eager).double()
    eager.train(), fast.train(), exact.train()
    for layout in ("nchw", "channels_last"):
        x = make_input((4, 3, 32, 32), torch.float32, layout, 0)
        logits_eager, logits_fast, logits_exact = eager(x), fast(x), exact(x.double())
        for k, (ours, theirs, exact_logits) in enumerate(zip(logits_fast, logits_eager, logits_exact, strict=True)):
            assert_as_accurate_as_eager(ours, theirs, exact_logits, f"exit {k}")
        for logits in (logits_eager, logits_fast, logits_exact):
            sum(l.square().mean() for l in logits).backward()
    exact_parameters, fast_parameters = dict(exact.named_parameters()), dict(fast.named_parameters())
    for name, p in eager.named_parameters():
        assert_as_accurate_as_eager(fast_parameters[name].grad, p.grad, exact_parameters[name].grad, f"grad of {name}")


def test_dense_block_train_under_triton_interpreter():
    script = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_train_mode import dense_block, make_input, assert_close, assert_same_state\n"
        "eager, fast = dense_block()\n"
        "x = make_input((2, 5, 6, 6), torch.float64, 'channels_last', 0)\n"
        "xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()\n"
        "(ye, oe), (yf, of) = eager(xe), fast(xf)\n"
        "assert_close(yf, ye, torch.float64, 'output')\n"
        "(ye.square().sum() + oe[1].sum()).backward()\n"
        "(yf.square().sum() + of[1].sum()).backward()\n"
        "assert_close(xf.grad, xe.grad, torch.float64, 'grad of x')\n"
        "assert_same_state(fast, eager, torch.float64)\n"
        "print('ok')\n"
    )
    run_script_on_triton_backend(script)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converted_ranet_train_on_gpu(monkeypatch, float32_without_tf32, backend, dtype):
    # float32_without_tf32: eager cuDNN convolutions (and both sides' conv backward) default to TF32
    # in float32. It sets torch's fp32_precision where torch has it (>= 2.9): monkeypatching the
    # legacy allow_tf32 flags there raises once anything has used the new settings.
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    torch.manual_seed(8)
    eager = RANet(ranet_config("cifar-c3")).to(dtype)
    randomize_bn(eager)
    fast = convert(copy.deepcopy(eager))
    eager.cuda().train(), fast.cuda().train()
    x = make_input((8, 3, 32, 32), dtype, "channels_last", 0).cuda()
    logits_eager, logits_fast = eager(x), fast(x)
    for k, (a, b) in enumerate(zip(logits_fast, logits_eager)):
        assert_close(a, b, dtype, f"exit {k}")
    sum(l.square().mean() for l in logits_eager).backward()
    sum(l.square().mean() for l in logits_fast).backward()
    fast_parameters = dict(fast.named_parameters())
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for name, p in eager.named_parameters():
        torch.testing.assert_close(fast_parameters[name].grad, p.grad, rtol=rtol,
                                   atol=rtol * p.grad.abs().max().item(), msg=lambda m: f"{name}: {m}")
