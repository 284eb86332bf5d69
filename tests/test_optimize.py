"""ranet_fast.inference.optimize: the inference-only model against the eager one it was made from.

The CPU tests cover the folded path (BN in the conv weights, channels_last, the CPU default) and
the converted fast-layer path (fold_weights=False, the CUDA default) on CPU tensors; the CUDA-graph
path has its own tests, which need a GPU.
"""

import copy

import pytest
import torch

import ranet_fast
from ranet_fast.inference import calibrate_thresholds, early_exit, exit_flops, optimize
from ranet_fast.models import MSDNet, RANet, msdnet_config, ranet_config
from ranet_fast.models.ranet import ConvBasic, ConvBN
from ranet_fast.nn.folded import FoldedConvBasic, FoldedConvBN, fold
from cuda_testing import NO_CUDA_GPU

SMALL = dict(nChannels=4, growthRate=4, step=2)  # C-1/C-3 layouts, narrow and shallow: fast on CPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)

# The CPU default (folded, channels_last), the folded NCHW variant, and the converted fast layers.
PATHS = {"folded-channels_last": {}, "folded-nchw": dict(channels_last=False),
         "converted": dict(fold_weights=False, channels_last=False)}


def randomise_batch_norms(model, seed):
    """Random affine BN parameters and statistics, so that no BN is the identity it starts as."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                dtype = module.weight.dtype
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator, dtype=dtype))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator, dtype=dtype))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator,
                                                            dtype=dtype))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator, dtype=dtype))
    return model


def build(name="cifar-c1", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = RANet(ranet_config(name, **{**SMALL, **overrides})).to(dtype).eval()
    return randomise_batch_norms(model, seed + 1)


def images(n, seed, dtype=torch.float64, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_logits_close(got, expected, rtol):
    """Every exit's logits within rtol of the largest expected logit of that exit."""
    assert len(got) == len(expected)
    for exit_index, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        error = (a - b).abs().max().item()
        assert error <= rtol * b.abs().max().item(), f"exit {exit_index}: max error {error}"


@pytest.mark.parametrize("name, path", [("cifar-c1", path) for path in PATHS] + [("cifar-c3", "folded-channels_last")])
def test_float64_logits_equal_eager(name, path):
    model = build(name)
    optimized = optimize(model, images(4, 1), **PATHS[path])
    for batch, seed in ((4, 2), (1, 3), (7, 4)):  # the example's batch size and others
        x = images(batch, seed)
        with torch.no_grad():
            expected = model(x)
        assert_logits_close(optimized(x), expected, rtol=1e-10)


def test_float32_full_width_c1_equals_eager_to_1e_5():
    torch.manual_seed(0)
    model = randomise_batch_norms(RANet(ranet_config("cifar-c1")).eval(), 1)
    x = images(4, 2, dtype=torch.float32)
    optimized = optimize(model, x)
    with torch.no_grad():
        expected = model(x)
    assert_logits_close(optimized(x), expected, rtol=1e-5)


def test_cpu_default_folds_every_conv_bn_relu_and_runs_channels_last():
    model = build()
    optimized = optimize(model, images(2, 1))
    assert optimized.memory_format == torch.channels_last and not optimized.cuda_graphs
    kinds = {type(m) for m in optimized.model.modules()}
    # Every ConvBasic / ConvBN became folded; nothing official or fast of those classes is left.
    assert ConvBasic not in kinds and ConvBN not in kinds
    assert optimized.layers["FoldedConvBN"] == sum(isinstance(m, FoldedConvBN) for m in optimized.model.modules())
    assert optimized.layers["FoldedConvBasic"] > 0
    first_conv = optimized.model.FirstLayer.layers[0]._ranet_fast_folded
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_example_and_nchw_inputs_give_the_same_logits():
    model = build()
    x = images(3, 1)
    optimized = optimize(model, x.contiguous(memory_format=torch.channels_last), fold_weights=False)
    assert optimized.memory_format == torch.channels_last
    with torch.no_grad():
        expected = model(x)
    assert_logits_close(optimized(x), expected, rtol=1e-10)  # NCHW input, converted on entry
    assert_logits_close(optimized(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-10)


def test_msdnet_is_optimized_too():
    torch.manual_seed(0)
    model = randomise_batch_norms(MSDNet(msdnet_config("cifar-batch", nBlocks=4, nChannels=8, growthRate=4,
                                                       data="cifar10")).double().eval(), 1)
    x = images(3, 2)
    optimized = optimize(model, x)
    assert optimized.layers.get("FoldedConvBasic", 0) > 0
    with torch.no_grad():
        expected = model(x)
    assert_logits_close(optimized(x), expected, rtol=1e-10)


def test_the_original_model_is_left_alone_and_the_copy_is_a_snapshot():
    model = build().train()
    state = copy.deepcopy(model.state_dict())
    x = images(3, 1)
    optimized = optimize(model, x)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert {type(m).__module__ for m in model.modules()} <= {"ranet_fast.models.ranet", "torch.nn.modules.container",
                                                            "torch.nn.modules.conv", "torch.nn.modules.batchnorm",
                                                            "torch.nn.modules.activation", "torch.nn.modules.linear",
                                                            "torch.nn.modules.pooling"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    before = optimized(x)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2)
    after = optimized(x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_outputs_are_inference_tensors_without_gradients():
    model = build()
    optimized = optimize(model, images(2, 1))
    x = images(2, 2).requires_grad_(True)
    logits = optimized(x)
    assert all(not t.requires_grad and t.is_inference() for t in logits)


def test_real_early_exit_through_the_optimized_model_equals_the_eager_engine():
    model = build()
    optimized = optimize(model, images(16, 1))
    flops = exit_flops(model, (32, 32))
    assert exit_flops(optimized, (32, 32)) == flops == ranet_fast.count_flops(optimized, 32)
    with torch.no_grad():
        val_logits = torch.stack(model(images(64, 5)))
    thresholds = calibrate_thresholds(val_logits, flops, p=1.0).thresholds
    x = images(16, 6)
    expected = early_exit(model, x, thresholds)
    got = early_exit(optimized, x, thresholds)
    assert got.exit_counts == expected.exit_counts and len(set(got.exit_counts)) > 1  # several exits used
    assert torch.equal(got.exit_index, expected.exit_index)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-10, atol=1e-12)
    assert got.stage_batch_sizes == expected.stage_batch_sizes


def test_fold_gives_the_official_forward_in_train_mode():
    model = build()
    folded = copy.deepcopy(model)
    fold(folded)
    assert any(isinstance(m, FoldedConvBasic) for m in folded.modules())
    x = images(4, 1)
    model.train(), folded.train()
    for a, b in zip(model(x), folded(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(model.buffers(), folded.buffers()):
        assert torch.equal(a, b)  # the running statistics took the same update


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.float(), "float32"),
    (lambda x: x.to("meta"), "meta"),
    (lambda x: x[:, :2], r"\[2, 2, 32, 32\]"),
    (lambda x: x[..., :16, :16], r"\[2, 3, 16, 16\]"),
    (lambda x: x[0], r"\[3, 32, 32\]"),
])
def test_inputs_unlike_the_example_are_refused_with_both_descriptions(bad, message):
    optimized = optimize(build(), images(2, 1))
    with pytest.raises(ValueError, match=message) as error:
        optimized(bad(images(2, 2)))
    assert "[N, 3, 32, 32] float64 on cpu" in str(error.value)
    with pytest.raises(ValueError, match=message):
        optimized.early_exit_start(bad(images(2, 2)))


def test_bad_arguments_and_misuse_are_refused():
    model = build()
    x = images(2, 1)
    with pytest.raises(TypeError, match="nn.Module"):
        optimize(lambda t: t, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        optimize(model, [x])
    with pytest.raises(ValueError, match="floating-point"):
        optimize(model, torch.zeros(2, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one sample"):
        optimize(model, x[:0])
    with pytest.raises(ValueError, match="needs a CUDA example_input"):
        optimize(model, x, cuda_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        optimize(model, x, max_graphs=0)
    optimized = optimize(model, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        optimized(x.numpy())
    with pytest.raises(RuntimeError, match="inference-only"):
        optimized.train()
    with pytest.raises(RuntimeError, match="fixed to the example's device and dtype"):
        optimized.float()
    optimized.eval()  # allowed: it already is
    assert not optimized.training


# The CUDA-graph path: runs only where a GPU is.


def cuda_model(dtype=torch.float32):
    torch.manual_seed(0)
    return randomise_batch_norms(RANet(ranet_config("cifar-c1")).eval(), 1).to("cuda", dtype)


@cuda
def test_cuda_graph_forward_equals_eager_and_recaptures_other_batch_sizes(float32_without_tf32):
    # TF32 off: eager cuDNN would otherwise round the products of every float32 conv to 10 bits
    # (~1e-3 relative), ten times this test's bound; our kernels compute in float32.
    model = cuda_model()
    x = images(8, 1, dtype=torch.float32).cuda()
    optimized = optimize(model, x, max_graphs=2)
    assert optimized.cuda_graphs
    with torch.no_grad():
        expected = model(x)
    first = optimized(x)
    assert_logits_close(first, expected, rtol=1e-4)  # float32 summation order differs from cuDNN's
    second = optimized(x * 2)  # the static buffers are overwritten; the first results are copies
    assert_logits_close(first, optimized(x), rtol=0)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    for batch in (3, 5, 8):
        y = images(batch, batch, dtype=torch.float32).cuda()
        with torch.no_grad():
            assert_logits_close(optimized(y), model(y), rtol=1e-4)
    assert sum(key[0] == "forward" for key in optimized._graphs) == 2  # max_graphs


@cuda
def test_cuda_graph_early_exit_equals_the_eager_engine():
    model = cuda_model(torch.float64)
    x = images(24, 1).cuda()
    optimized = optimize(model, x)
    with torch.no_grad():
        val_logits = torch.stack(model(images(128, 5).cuda()))
    thresholds = calibrate_thresholds(val_logits.cpu(), exit_flops(model, (32, 32)), p=1.0).thresholds
    expected = early_exit(model, x, thresholds)
    got = early_exit(optimized, x, thresholds)
    assert got.exit_counts == expected.exit_counts
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-9, atol=1e-9)


@cuda
def test_cuda_graph_bf16_channels_last_runs():
    model = cuda_model(torch.bfloat16)
    x = images(16, 1, dtype=torch.bfloat16).cuda().contiguous(memory_format=torch.channels_last)
    optimized = optimize(model, x)
    with torch.no_grad():
        eager = model(x)
        # The same bfloat16 weights and input, computed exactly: what both bfloat16 runs approximate.
        exact = copy.deepcopy(model).double()(x.double())
    # bfloat16 rounding compounds through C-1's depth: on the CPU, eager bfloat16 is 0.7% (first exit)
    # to 4% (last) of the largest logit off the exact result, and eager and our fused layers differ
    # from each other by up to 3.4%, too close to a fixed bound. Ours rounds once per fused layer,
    # eager once per op, so ours must be no less accurate than eager: within twice eager's error
    # (rounding is random), and never required below one bfloat16 rounding of the largest logit.
    for exit_index, (ours, theirs, truth) in enumerate(zip(optimized(x), eager, exact)):
        assert ours.shape == truth.shape and ours.dtype == torch.bfloat16
        scale = truth.abs().max().item()
        our_error = (ours.double() - truth).abs().max().item()
        eager_error = (theirs.double() - truth).abs().max().item()
        assert our_error <= max(2 * eager_error, 2**-8 * scale), (
            f"exit {exit_index}: error {our_error:.3g} against float64, eager bfloat16's {eager_error:.3g}")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_static_graph_inputs_are_zeros_in_the_inputs_memory_format(memory_format):
    """The CUDA-graph buffers (built on the CPU here: the allocation is device-independent). Found on
    the first GPU run: torch.zeros takes no memory_format, so every CUDA-graph capture failed."""
    from ranet_fast.inference.optimize import _static_like

    example = torch.randn(2, 5, 4, 3).contiguous(memory_format=memory_format)
    static = _static_like(example, 7)
    assert static.shape == (7, 5, 4, 3) and static.is_contiguous(memory_format=memory_format)
    assert torch.equal(static, torch.zeros(7, 5, 4, 3))
