"""Dense layers on fused_conv2d (ranet_fast/nn/dense.py): a converted RANet equals the eager one.

Eval mode is compared in float64 under torch.no_grad() (the concat-free buffer path) and with
gradients (the differentiable functional path). Train mode: tests/test_train_mode.py (and the
whole-network comparison with gradients in both modes is in tests/test_fusion_layers.py).
"""

import copy

import pytest
import torch

from ranet_fast import _extension
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.ranet import ConvBasic, ConvBN, ConvNormal, ConvUpNormal, _BlockNormal
from ranet_fast.nn import FastBlockNormal, FastConvBasic, FastConvBN, FastConvNormal, FastConvUpNormal, convert
from triton_interpreter import run_script_on_triton_backend
from cuda_testing import NO_CUDA_GPU
from model_testing import randomize_bn

needs_extension = pytest.mark.skipif(not _extension.extension_loaded(), reason="ranet_fast._C is not built")


def eager_and_fast(name, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    eager = RANet(ranet_config(name, **overrides)).to(dtype)
    randomize_bn(eager, seed)
    return eager.eval(), convert(copy.deepcopy(eager)).eval()


def assert_logits_close(ours, theirs, rtol):
    """Each exit's logits within rtol of that exit's largest logit magnitude."""
    for k, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(),
                                   msg=lambda m: f"exit {k}: {m}")


def test_convert_swaps_every_dense_module_and_keeps_state_dict():
    eager, fast = eager_and_fast("cifar-c3")
    for official, fast_class in ((ConvBasic, FastConvBasic), (ConvBN, FastConvBN), (ConvNormal, FastConvNormal),
                                 (_BlockNormal, FastBlockNormal)):
        count = sum(type(m) is official for m in eager.modules())
        assert count > 0 and fast.ranet_fast_converted[fast_class.__name__] == count
        assert not any(type(m) is official for m in fast.modules())
    assert list(fast.state_dict()) == list(eager.state_dict())
    fast.load_state_dict(eager.state_dict(), strict=True)  # an official checkpoint loads strictly


# Every configuration and layout on the compiled CPU kernels; the reference backend (the fallback)
# on one layout per configuration, to keep the runtime down.
@pytest.mark.parametrize(("backend", "name", "layout"), [
    *[pytest.param("cpu", name, layout, marks=needs_extension) for name in ("cifar-c1", "cifar-c3")
      for layout in ("nchw", "channels_last")],
    ("reference", "cifar-c1", "nchw"),
    ("reference", "cifar-c3", "channels_last"),
])
def test_converted_ranet_eval_equals_eager_float64(monkeypatch, backend, name, layout):
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    eager, fast = eager_and_fast(name)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_logits_close(fast(x), eager(x), rtol=1e-10)


def _block(bottleneck=True, dtype=torch.float64, seed=0, trans=True):
    torch.manual_seed(seed)
    block = _BlockNormal(3, 5, 4, 0.5, trans, 2)
    for layer in block.layers:
        if not bottleneck:  # the pre-activation ConvBN: BN -> ReLU -> conv, twice
            layer.conv_normal = ConvBN(layer.conv_normal.net[0].in_channels, 4, "normal", False, 2)
    block = block.to(dtype)
    randomize_bn(block, seed)
    return block, convert(copy.deepcopy(block))


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bn-after", "pre-activation"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
def test_dense_block_eval_equals_eager(bottleneck, layout):
    eager, fast = _block(bottleneck)
    eager.eval(), fast.eval()
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "slice":
        x = torch.randn(2, 8, 9, 7, dtype=torch.float64)[:, 1:6]
    with torch.no_grad():
        (y, outputs), (y_eager, outputs_eager) = fast(x), eager(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    assert len(outputs) == len(outputs_eager)
    for ours, theirs in zip(outputs, outputs_eager):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":
        assert outputs[-1].is_contiguous(memory_format=torch.channels_last)


def test_dense_block_eval_uses_one_buffer_and_no_cat(monkeypatch):
    _, fast = _block()
    fast.eval()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called in the eval-mode dense block")

    monkeypatch.setattr(torch, "cat", no_cat)
    with torch.no_grad():
        _, outputs = fast(x)
    assert outputs[0] is x
    buffer = outputs[-1]
    assert buffer.shape[1] == 5 + 3 * 4
    for prefix in outputs[1:]:
        assert prefix.data_ptr() == buffer.data_ptr() and prefix.shape[1] <= buffer.shape[1]


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bn-after", "pre-activation"])
def test_dense_block_eval_gradients_equal_eager(bottleneck):
    """Eval mode with gradients (e.g. fine-tuning with frozen statistics): the functional path."""
    eager, fast = _block(bottleneck)
    eager.eval(), fast.eval()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    x_eager, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    (y_eager, outputs_eager), (y_fast, outputs_fast) = eager(x_eager), fast(x_fast)
    torch.testing.assert_close(y_fast, y_eager, rtol=1e-12, atol=1e-12)
    weighting = torch.randn_like(y_eager)
    ((y_eager * weighting).sum() + outputs_eager[2].sum()).backward()
    ((y_fast * weighting).sum() + outputs_fast[2].sum()).backward()
    torch.testing.assert_close(x_fast.grad, x_eager.grad, rtol=1e-12, atol=1e-12)
    fast_parameters = dict(fast.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(fast_parameters[name].grad, p.grad, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")


def test_pre_activation_train_mode_is_the_official_computation():
    """The pre-activation ConvBN trains through the official forward, bit for bit: outputs, gradients
    and running statistics (two steps, so updated stats are used). The bnAfter layers' own
    train-mode path is tested in tests/test_train_mode.py (the transition, a ConvBasic, is one of
    them, hence none here)."""
    eager, fast = _block(False, dtype=torch.float32, trans=False)
    eager.train(), fast.train()
    for step in range(2):
        x = torch.randn(3, 5, 6, 6)
        x_eager, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        (y_eager, _), (y_fast, _) = eager(x_eager), fast(x_fast)
        assert torch.equal(y_fast, y_eager)
        y_eager.square().sum().backward()
        y_fast.square().sum().backward()
        assert torch.equal(x_fast.grad, x_eager.grad)
    fast_parameters = dict(fast.named_parameters())
    for name, p in eager.named_parameters():
        assert torch.equal(fast_parameters[name].grad, p.grad), name
    fast_buffers = dict(fast.named_buffers())
    for name, b in eager.named_buffers():
        assert torch.equal(fast_buffers[name], b), name


def test_mode_switches_per_call():
    eager, fast = eager_and_fast("cifar-c1", nChannels=4, growthRate=4, step=2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (False, True, False):
        eager.train(training), fast.train(training)
        with torch.no_grad():
            assert_logits_close(fast(x), eager(x), rtol=1e-10)
    for (name, a), b in zip(fast.named_buffers(), eager.buffers()):
        # The train-mode call updated both models' statistics alike (the fusion layers' upsample_concat
        # may round differently from interpolate + cat, hence not bit for bit).
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bn-after", "pre-activation"])
def test_conv_normal_alone(bottleneck):
    torch.manual_seed(4)
    eager = ConvNormal(6, 3, bottleneck, 2).double()
    randomize_bn(eager, 4)
    fast = convert(copy.deepcopy(eager)).eval()
    eager.eval()
    assert type(fast) is FastConvNormal and type(fast.conv_normal) is FastConvBN
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fast([x])  # the official layer also accepts a one-element list
        torch.testing.assert_close(y, eager(x), rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
def test_fusion_layer_eval_equals_eager_without_cat(monkeypatch, down):
    """FastConvUpNormal in eval mode: res written into its slice, the resized parts by upsample_concat(out=)."""
    torch.manual_seed(6)
    eager = ConvUpNormal(6, 5, 8, True, 2, 1, 0.25, down).double()
    randomize_bn(eager, 6)
    fast = convert(copy.deepcopy(eager)).eval()
    eager.eval()
    assert type(fast) is FastConvUpNormal
    x_low = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    x_cur = torch.randn(2, 6, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = eager([x_low, x_cur])

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called in the eval-mode fusion layer")

    monkeypatch.setattr(torch, "cat", no_cat)
    with torch.no_grad():
        y = fast([x_low, x_cur])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)


def _conv_basic():
    torch.manual_seed(5)
    eager = ConvBasic(4, 6, kernel=3, stride=2, padding=1).double()
    randomize_bn(eager, 5)
    return eager.eval(), convert(copy.deepcopy(eager)).eval()


def test_bn_fold_cache_is_reused_and_invalidated():
    eager, fast = _conv_basic()
    bn, fast_bn = eager.net[1], fast.net[1]
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fast(x), eager(x), rtol=1e-12, atol=1e-12)

    check()
    cached = fast._ranet_fast_folded_bn["net.1"][2]
    check()
    assert fast._ranet_fast_folded_bn["net.1"][2] is cached  # nothing changed: no refold

    for change in (lambda m: m.running_mean.add_(1), lambda m: m.running_var.mul_(2),
                   lambda m: m.weight.mul_(-1), lambda m: m.bias.add_(0.5)):
        with torch.no_grad():
            change(bn), change(fast_bn)
        check()
    new_state = {k: v + 0.25 if v.is_floating_point() else v for k, v in eager.state_dict().items()}
    eager.load_state_dict(new_state)
    fast.load_state_dict(new_state)
    check()
    # Replacing a tensor (not modifying it) also invalidates, as does a change of dtype.
    bn.running_var = bn.running_var * 3
    fast_bn.running_var = fast_bn.running_var * 3
    check()
    eager.float(), fast.float()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.float()), eager(x.float()), rtol=1e-5, atol=1e-5)


def test_bn_parameters_get_gradients_in_eval_mode():
    """With grad enabled and BN parameters requiring grad, the folding is differentiable (not cached)."""
    eager, fast = _conv_basic()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    eager(x).sum().backward()
    fast(x).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_eval_dense_block_compiles_fullgraph():
    """torch.compile traces the concat-free eval path without graph breaks, in-place slice writes included."""
    eager, fast = _block()
    eager.eval(), fast.eval()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    graph_ops = []

    def recording_backend(graph_module, example_inputs):
        graph_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    with torch.no_grad():
        expected, expected_outputs = eager(x)
        y, _ = torch.compile(fast, fullgraph=True, backend=recording_backend)(x)
        torch._dynamo.reset()
        # Through AOTAutograd's functionalisation of the out= writes as well.
        y_aot, outputs_aot = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_aot, expected, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(outputs_aot, expected_outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert any(op.removesuffix(".default") == "ranet_fast.fused_conv2d_out" for op in graph_ops), graph_ops


def test_converted_ranet_under_triton_interpreter():
    """Eval mode, no grad, on the Triton backend (the with-gradient paths run in test_fusion_layers)."""
    script = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_dense_layers import eager_and_fast, assert_logits_close\n"
        "eager, fast = eager_and_fast('cifar-c1', nChannels=4, growthRate=4, step=2)\n"
        "x = torch.randn(1, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)\n"
        "with torch.no_grad():\n"
        "    assert_logits_close(fast(x), eager(x), rtol=1e-10)\n"
        "print('ok')\n"
    )
    run_script_on_triton_backend(script)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converted_ranet_eval_on_gpu(monkeypatch, float32_without_tf32, backend, dtype):
    # float32_without_tf32: the eager side is cuDNN, whose float32 convolutions default to TF32
    # (~1e-3 relative error), far outside the float32 bound of 1e-4 used below.
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    eager, fast = eager_and_fast("cifar-c3", dtype)
    x = torch.randn(4, 3, 32, 32, dtype=dtype, device="cuda")
    with torch.no_grad():
        assert_logits_close(fast.cuda()(x), eager.cuda()(x), rtol=1e-10 if dtype == torch.float64 else 1e-4)

