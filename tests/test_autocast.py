"""The fast layers under torch.autocast (ranet_fast/nn/precision.py) against eager autocast.

Each test proves the fused path ran: every nn.Conv2d.forward raises while the converted modules
run (the eager fallback calls it), and the fused_conv2d calls of the fast layers are counted, one
per conv. The results are compared with the eager modules under the same autocast: outputs in the
dtype eager gives, outputs and gradients within bfloat16 tolerance (1e-2 relative, in norm) of
eager's, or, where eager's own distance from the float64 result is larger than that (gradients
of a deep network in bfloat16 can be far from exact), within twice that distance; BN running
statistics stay float32 and within 1e-2 of eager's. CPU bfloat16 and float16 always; CUDA
bfloat16 and float16 where a GPU exists.
"""

import copy

import pytest
import torch
import torch.nn as nn

from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.ranet import ConvBasic, ConvBN, ConvUpNormal, _BlockNormal
from ranet_fast.nn import convert, dense, precision, train_mode
from cuda_testing import NO_CUDA_GPU
from model_testing import randomize_bn

BF16_RTOL = 1e-2
CASES = [
    ("cpu", torch.bfloat16), ("cpu", torch.float16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)),
]


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.detach().double()
    return ((ours.detach().double() - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


def assert_like_eager(ours, eager, exact, what):
    """ours within BF16_RTOL of eager autocast, or within twice eager's own distance from exact."""
    bound = max(BF16_RTOL, 2 * relative(eager, exact))
    assert ours.shape == eager.shape
    assert relative(ours, eager) <= bound, f"{what}: {relative(ours, eager):.3g} from eager autocast (bound {bound:.3g})"


class FusedPathProbe:
    """Counts the fast layers' fused_conv2d calls; any eager nn.Conv2d forward is an error."""

    def __init__(self, monkeypatch):
        self.calls = 0

        def eager_conv(module, x):
            raise AssertionError("an eager nn.Conv2d ran: the fast layer fell back to its official forward")

        monkeypatch.setattr(nn.Conv2d, "forward", eager_conv)
        for namespace in (dense, train_mode):
            monkeypatch.setattr(namespace, "fused_conv2d", self._counting(namespace.fused_conv2d))

    def _counting(self, op):
        def counted(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)
        return counted


def num_convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def run_eager(module, inputs, device, dtype, train):
    with torch.autocast(device, dtype=dtype):
        return module(inputs if len(inputs) > 1 else inputs[0])


def first(output):
    return output[0] if isinstance(output, tuple) else output


def loss_of(output) -> torch.Tensor:
    """A loss that weights every output element differently (a plain sum would hide permutations)."""
    outputs = output if isinstance(output, list) else [first(output)]
    total = 0
    for y in outputs:
        weights = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float32).view(y.shape)
        total = total + (y.float() * weights).sum()
    return total


def three_copies(module: nn.Module, device: str):
    """(eager float32, converted float32, eager float64) copies of ``module`` on ``device``."""
    randomize_bn(module, 0)
    eager = module.to(device)
    fast = convert(copy.deepcopy(eager))
    exact = copy.deepcopy(eager).double()
    return eager, fast, exact


LAYERS = {
    "ConvBasic": (lambda: ConvBasic(5, 8), [(6, 5, 9, 9)]),
    "ConvBN": (lambda: ConvBN(6, 4, "down", True, 2), [(6, 6, 9, 9)]),
    "dense block": (lambda: _BlockNormal(3, 6, 4, 0.5, True, 2), [(6, 6, 8, 8)]),
    "fusion layer": (lambda: ConvUpNormal(6, 5, 8, True, 2, 2, 0.5, True), [(6, 5, 4, 4), (6, 6, 8, 8)]),
}


def layer_inputs(shapes, device, layout, low_precision):
    generator = torch.Generator().manual_seed(3)
    xs = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.3
        # Inside a network, every activation a fast layer receives under autocast is a conv output
        # in the autocast dtype; the stem's ConvBasic receives the float32 image.
        x = x.to(low_precision if low_precision is not None else torch.float32).to(device)
        xs.append(x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x)
    return xs


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layer_train_step_under_autocast_is_fused_and_matches_eager(monkeypatch, device, dtype, layer, layout):
    make, shapes = LAYERS[layer]
    torch.manual_seed(2)
    eager, fast, exact = three_copies(make().train(), device)
    low_precision = None if layer == "ConvBasic" else dtype
    xs = layer_inputs(shapes, device, layout, low_precision)
    eager_inputs = [x.detach().clone().requires_grad_() for x in xs]
    fast_inputs = [x.detach().clone().requires_grad_() for x in xs]
    exact_inputs = [x.detach().double().requires_grad_() for x in xs]
    eager_out = run_eager(eager, eager_inputs, device, dtype, True)
    exact_out = exact(exact_inputs if len(xs) > 1 else exact_inputs[0])
    probe = FusedPathProbe(monkeypatch)
    with torch.autocast(device, dtype=dtype):
        fast_out = fast(fast_inputs if len(xs) > 1 else fast_inputs[0])
    monkeypatch.undo()
    assert probe.calls == num_convs(fast)
    assert first(fast_out).dtype == first(eager_out).dtype == dtype
    assert_like_eager(first(fast_out), first(eager_out), first(exact_out), "output")
    for out in (eager_out, fast_out, exact_out):
        loss_of(out).backward()
    for i, (a, b, c) in enumerate(zip(fast_inputs, eager_inputs, exact_inputs)):
        assert a.grad.dtype == b.grad.dtype
        assert_like_eager(a.grad, b.grad, c.grad, f"grad of input {i}")
    exact_parameters, fast_parameters = dict(exact.named_parameters()), dict(fast.named_parameters())
    for name, p in eager.named_parameters():
        assert fast_parameters[name].grad.dtype == torch.float32
        assert_like_eager(fast_parameters[name].grad, p.grad, exact_parameters[name].grad, f"grad of {name}")
    fast_buffers = dict(fast.named_buffers())
    for name, b in eager.named_buffers():
        if b.is_floating_point():
            assert fast_buffers[name].dtype == torch.float32, name
            torch.testing.assert_close(fast_buffers[name], b, rtol=BF16_RTOL, atol=BF16_RTOL * b.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(fast_buffers[name], b), name


def small_ranet():
    return RANet(ranet_config("cifar-c1", nChannels=8, growthRate=4, step=2))


@pytest.mark.parametrize("device, dtype", CASES)
def test_ranet_train_steps_under_autocast_are_fused_and_match_eager(monkeypatch, device, dtype):
    """Three SGD steps of a converted C-1 under autocast: each step's logits, all gradients together
    and the running statistics like eager autocast's from the same state. The eager models take
    the fast model's state before every step, so the later steps run the fast layers on weights
    the optimizer changed in place: a stale cached low-precision weight would show."""
    torch.manual_seed(5)
    eager, fast, exact = three_copies(small_ranet().train(), device)
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.2)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    for step in range(3):
        for model in (eager, exact):
            model.load_state_dict(fast.state_dict())
            model.zero_grad()
        optimizer.zero_grad()
        eager_logits = run_eager(eager, [x], device, dtype, True)
        exact_logits = exact(x.double())
        with monkeypatch.context() as patch:
            probe = FusedPathProbe(patch)
            with torch.autocast(device, dtype=dtype):
                fast_logits = fast(x)
        assert probe.calls == num_convs(fast)
        for k, (a, b, c) in enumerate(zip(fast_logits, eager_logits, exact_logits, strict=True)):
            assert a.dtype == b.dtype == dtype
            assert_like_eager(a, b, c, f"step {step}, exit {k}")
        for logits in (eager_logits, fast_logits, exact_logits):
            sum(loss_of(l) for l in logits).backward()
        gradients = [torch.cat([p.grad.double().flatten() for p in m.parameters()]) for m in (fast, eager, exact)]
        assert_like_eager(*gradients, f"step {step}, all parameter gradients")
        for (name, a), b in zip(fast.named_buffers(), eager.buffers(), strict=True):
            if b.is_floating_point():
                assert a.dtype == b.dtype == torch.float32
                torch.testing.assert_close(a, b, rtol=BF16_RTOL, atol=BF16_RTOL * b.abs().max().item(),
                                           msg=lambda m: f"step {step}, {name}: {m}")
            else:
                assert torch.equal(a, b), name
        optimizer.step()


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ranet_eval_under_autocast_is_fused_and_matches_eager(monkeypatch, device, dtype, layout):
    torch.manual_seed(6)
    eager, fast, exact = three_copies(small_ranet().eval(), device)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager_logits = run_eager(eager, [x], device, dtype, False)
        exact_logits = exact(x.double())
        probe = FusedPathProbe(monkeypatch)
        with torch.autocast(device, dtype=dtype):
            fast_logits = fast(x)
    assert probe.calls == num_convs(fast)
    for k, (a, b, c) in enumerate(zip(fast_logits, eager_logits, exact_logits, strict=True)):
        assert a.dtype == b.dtype == dtype
        assert_like_eager(a, b, c, f"exit {k}")


def test_float32_input_to_a_dense_block_under_autocast_runs_eagerly_and_stays_float32():
    """Eager's cat of a float32 input with bfloat16 conv outputs is float32; the fast block gives
    the same (through the official forward) instead of a bfloat16 buffer."""
    torch.manual_seed(3)
    eager, fast, _ = three_copies(_BlockNormal(3, 6, 4, 0.5, True, 2).train(), "cpu")
    x = torch.randn(4, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (_, eager_outputs), (_, fast_outputs) = eager(x), fast(x)
    # The last layer's output (before the transition conv, whose output is bfloat16 again).
    assert fast_outputs[-1].dtype == eager_outputs[-1].dtype == torch.float32
    assert torch.equal(fast_outputs[-1], eager_outputs[-1])


def test_conv_weight_is_cast_once_and_again_after_a_change():
    conv = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        first_cast = precision.conv_weight(conv, torch.bfloat16)
        assert first_cast.dtype == torch.bfloat16 and first_cast.is_contiguous()
        assert torch.equal(first_cast, conv.weight.to(torch.bfloat16))
        assert precision.conv_weight(conv, torch.bfloat16) is first_cast
        # float32, already the dtype but channels_last: laid out once too.
        layout = precision.conv_weight(conv, torch.float32)
        assert layout.is_contiguous() and precision.conv_weight(conv, torch.float32) is layout
        conv.weight.add_(1.0)  # what an optimizer step does
        second_cast = precision.conv_weight(conv, torch.bfloat16)
        assert second_cast is not first_cast and torch.equal(second_cast, conv.weight.to(torch.bfloat16))
        conv.weight = nn.Parameter(torch.randn(6, 4, 3, 3))  # replaced, not modified
        assert torch.equal(precision.conv_weight(conv, torch.bfloat16), conv.weight.to(torch.bfloat16))
    # A contiguous weight of the asked dtype is used as it is.
    assert precision.conv_weight(conv, torch.float32) is conv.weight
    # With gradients to the weight, the cast is the differentiable one.
    cast = precision.conv_weight(conv, torch.bfloat16)
    cast.float().sum().backward()
    assert torch.equal(conv.weight.grad, torch.ones_like(conv.weight))


def test_conv_dtype_follows_eager_autocast():
    x, weight = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
    assert precision.conv_dtype(x, weight) == torch.float32
    assert precision.conv_dtype(x.double(), weight) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precision.conv_dtype(x, weight) == torch.bfloat16
        assert precision.conv_dtype(x.half(), weight) == torch.bfloat16
        # eager autocast leaves float64 alone, and a float64 x with a float32 weight fails in eager
        assert precision.conv_dtype(x.double(), weight) is None


def test_converted_sequential_under_autocast_fuses_inputs_in_the_autocast_dtype(monkeypatch):
    """convert's generic segments: an input already in the autocast dtype runs fused (both
    segments, each one folded convolution in the autocast dtype, outputs like eager autocast's); a
    float32 input runs the children eagerly."""
    from ranet_fast.nn import generic

    torch.manual_seed(4)
    eager = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
    randomize_bn(eager, 1)
    eager.eval()
    fast = convert(copy.deepcopy(eager))
    x = torch.randn(3, 5, 7, 7)
    calls = []
    original = generic.run_segment
    monkeypatch.setattr(generic, "run_segment", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = fast(x.bfloat16()), eager(x.bfloat16())
        assert len(calls) == 2 and ours.dtype == theirs.dtype == torch.bfloat16
        assert relative(ours, theirs) <= BF16_RTOL
        calls.clear()
        ours, theirs = fast(x), eager(x)
        assert calls == [] and torch.equal(ours, theirs)
