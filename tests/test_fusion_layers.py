"""Fusion layers on upsample_concat: a converted RANet equals the eager one.

Compared in float64 (tight tolerance) and float32, in eval and train mode: logits, gradients of
every parameter and of the input, and BatchNorm running statistics, on every backend available
here (the Triton backend runs under TRITON_INTERPRET=1 in a subprocess: the interpreter must be
chosen before triton is imported).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import ranet_fast
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.ranet import ConvUpNormal, _BlockUpNormal
from ranet_fast.nn import FastBlockUpNormal, FastConvUpNormal, convert
from cuda_testing import NO_CUDA_GPU


def eager_and_fast(name: str, dtype: torch.dtype, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    eager = RANet(ranet_config(name, **overrides)).to(dtype)
    # Non-trivial BN statistics and affine parameters so that eval mode is a real test.
    with torch.no_grad():
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return eager, convert(copy.deepcopy(eager))


def compare(eager, fast, x, train: bool, rtol: float):
    eager.train(train)
    fast.train(train)
    x_eager = x.clone().requires_grad_(True)
    x_fast = x.clone().requires_grad_(True)
    out_eager, out_fast = eager(x_eager), fast(x_fast)
    for k, (a, b) in enumerate(zip(out_fast, out_eager)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=lambda m: f"exit {k}: {m}")
    weights = [torch.randn_like(o) for o in out_eager]
    sum((o * w).sum() for o, w in zip(out_eager, weights)).backward()
    sum((o * w).sum() for o, w in zip(out_fast, weights)).backward()
    torch.testing.assert_close(x_fast.grad, x_eager.grad, rtol=rtol, atol=rtol)
    fast_params = dict(fast.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=rtol, atol=rtol, msg=lambda m: f"{name}: {m}")
    fast_buffers = dict(fast.named_buffers())
    for name, b in eager.named_buffers():
        torch.testing.assert_close(fast_buffers[name], b, rtol=rtol, atol=rtol)


def test_convert_swaps_every_fusion_module_and_keeps_state_dict():
    eager, fast = eager_and_fast("cifar-c1", torch.float32)
    assert not any(type(m) in (ConvUpNormal, _BlockUpNormal) for m in fast.modules())
    layers = sum(isinstance(m, ConvUpNormal) for m in eager.modules())
    blocks = sum(isinstance(m, _BlockUpNormal) for m in eager.modules())
    assert fast.ranet_fast_converted["FastConvUpNormal"] == layers
    assert fast.ranet_fast_converted["FastBlockUpNormal"] == blocks
    assert list(fast.state_dict()) == list(eager.state_dict())
    # An official checkpoint loads strictly into the converted model.
    fast.load_state_dict(eager.state_dict(), strict=True)
    assert ranet_fast.convert is convert


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", ["cifar-c1", "cifar-c2", "cifar-c3"])
@pytest.mark.parametrize("train", [False, True])
def test_converted_ranet_equals_eager_float64(monkeypatch, backend, name, train):
    if backend == "cpu" and not ranet_fast._extension.extension_loaded():
        pytest.skip("ranet_fast._C is not built")
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    eager, fast = eager_and_fast(name, torch.float64)
    compare(eager, fast, torch.randn(2, 3, 32, 32, dtype=torch.float64), train, rtol=1e-9)


@pytest.mark.parametrize("train", [False, True])
def test_converted_ranet_equals_eager_channels_last_float64(train):
    eager, fast = eager_and_fast("cifar-c3", torch.float64)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    compare(eager, fast, x, train, rtol=1e-9)


@pytest.mark.parametrize("train", [False, True])
def test_converted_ranet_float32_logits(train):
    """float32 forward of the whole network. Exactness is shown in float64 above; in float32 a
    40-layer network's results depend on summation order at ~1e-6 per op and ReLU masks flip for
    pre-activations within that noise of zero, so gradients are not compared here and logits are
    held to 1e-4 of their largest magnitude (a wrong layout or slice would be off by O(1))."""
    eager, fast = eager_and_fast("cifar-c3", torch.float32)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    eager.train(train)
    fast.train(train)
    with torch.no_grad():
        for k, (ours, theirs) in enumerate(zip(fast(x), eager(x))):
            error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
            assert error < 1e-4, f"exit {k}: {error:.2e}"


def test_converted_ranet_empty_batch():
    _, fast = eager_and_fast("cifar-c1", torch.float32)
    with torch.no_grad():
        logits = fast.eval()(torch.randn(0, 3, 32, 32))
    assert [tuple(l.shape) for l in logits] == [(0, 10)] * 6


def test_converted_ranet_batch_of_one_matches():
    eager, fast = eager_and_fast("cifar-c1", torch.float32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eager.eval()
    fast.eval()
    with torch.no_grad():
        exact = copy.deepcopy(eager).double()(x.double())
        # Both float32 runs approximate the float64 one; they sum in different orders, so they may
        # differ from each other by more than either differs from it (seen on torch 2.11: 6e-5 at a
        # logit of 3). Ours must be as accurate as eager (twice its error, rounding being random)
        # and within fp32's 1e-5 of the largest logit.
        for ours, theirs, truth in zip(fast(x), eager(x), exact):
            scale = truth.abs().max().item()
            our_error = (ours.double() - truth).abs().max().item()
            eager_error = (theirs.double() - truth).abs().max().item()
            assert our_error <= max(2 * eager_error, 1e-5 * scale), (our_error, eager_error, scale)


def test_converted_ranet_under_triton_interpreter():
    pytest.importorskip("triton")
    script = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_fusion_layers import eager_and_fast, compare\n"
        "eager, fast = eager_and_fast('cifar-c1', torch.float64, nChannels=4, growthRate=4, step=2)\n"
        "for train in (False, True):\n"
        "    compare(eager, fast, torch.randn(1, 3, 32, 32, dtype=torch.float64), train, rtol=1e-9)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", RANET_FAST_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_converted_ranet_equals_eager_on_gpu(monkeypatch, backend):
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    eager, fast = eager_and_fast("cifar-c3", torch.float64)
    compare(eager.cuda(), fast.cuda(), torch.randn(4, 3, 32, 32, dtype=torch.float64, device="cuda"), True, rtol=1e-9)
