"""ranet_fast.convert on any model: RANet, MSDNet, torchvision models and hand-written modules.

Every converted model is compared with its eager copy on random inputs: float64 to 1e-9 of the
largest output (fp32 to 1e-5), without gradients (the in-place paths), with gradients (the
differentiable fused op) and in train mode (the original computation), including the BN running
statistics and parameters after an SGD step. BN statistics and affine parameters are randomised
first, so folding them is a real test.
"""

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.densenet import _DenseBlock, _DenseLayer
from torchvision.models.inception import BasicConv2d

import ranet_fast
from ranet_fast.models import MSDNet, RANet, msdnet_config, ranet_config
from ranet_fast.models.msdnet import MSDNFirstLayer
from ranet_fast.nn.generic import FastChainMixin, FastGraphMixin, FastSequentialMixin
from ranet_fast.nn.msdnet_layers import FastConvDownNormal, FastMSDConvNormal
from ranet_fast.nn.torchvision_densenet import FastDenseBlock, FastDenseLayer
from model_testing import randomize_bn

RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def outputs_of(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def assert_close(ours, theirs, dtype, what):
    """Each output within rtol of its largest magnitude."""
    rtol = RTOL[dtype]
    for k, (a, b) in enumerate(zip(outputs_of(ours), outputs_of(theirs), strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-30),
                                   msg=lambda m: f"{what} {k}: {m}")


def eager_and_fast(model: nn.Module, dtype=torch.float64, seed=0):
    model = model.to(dtype)
    randomize_bn(model, seed)
    return model, ranet_fast.convert(copy.deepcopy(model))


def check_equivalent(eager, fast, x, dtype=torch.float64):
    """Eval without and with gradients, then a train step: outputs, gradients, statistics, parameters."""
    eager.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast(x), eager(x), dtype, "eval output")
    x_eager, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    check_backward(eager, fast, x_eager, x_fast, dtype, "eval")

    eager.train(), fast.train()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, fast)]
    check_backward(eager, fast, x.clone().requires_grad_(), x.clone().requires_grad_(), dtype, "train")
    for optimizer in optimizers:
        optimizer.step()
    fast_state = fast.state_dict()
    for name, value in eager.state_dict().items():  # running statistics, counters and stepped weights
        if value.is_floating_point():
            assert_close(fast_state[name], value, dtype, name)
        else:
            assert torch.equal(fast_state[name], value), name
    eager.eval(), fast.eval()
    with torch.no_grad():  # the updated statistics are folded, not stale cached ones
        assert_close(fast(x), eager(x), dtype, "eval output after a train step")


def check_backward(eager, fast, x_eager, x_fast, dtype, mode):
    for model in (eager, fast):
        model.zero_grad(set_to_none=True)
    # The same random draws for both (mobilenet's dropout in train mode).
    torch.manual_seed(7)
    ours = outputs_of(fast(x_fast))
    torch.manual_seed(7)
    theirs = outputs_of(eager(x_eager))
    assert_close(ours, theirs, dtype, f"{mode} output")
    weights = [torch.randn_like(t) for t in theirs]
    sum((t * w).sum() for t, w in zip(theirs, weights)).backward()
    sum((t * w).sum() for t, w in zip(ours, weights)).backward()
    assert_close(x_fast.grad, x_eager.grad, dtype, f"{mode} input gradient")
    fast_parameters = dict(fast.named_parameters())
    # A conv bias before a train-mode BN has an analytically zero gradient (BN removes the mean),
    # so its computed value is rounding noise: gradients are compared against the model's
    # largest gradient, not each tensor's own (possibly noise-sized) scale.
    scale = max(p.grad.abs().max().item() for p in eager.parameters() if p.grad is not None)
    for name, p in eager.named_parameters():
        torch.testing.assert_close(fast_parameters[name].grad, p.grad, rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                                   msg=lambda m: f"{mode} gradient of {name}: {m}")


def check_state_dict(eager, fast):
    assert list(fast.state_dict()) == list(eager.state_dict())
    fast.load_state_dict(eager.state_dict(), strict=True)


def image(batch=2, dtype=torch.float64, channels_last=False, seed=1):
    x = torch.randn(batch, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def small_densenet():
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)


# Hand-written modules -------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """Named siblings, the chain in forward, ReLU as a function."""

    def __init__(self, c_in, c_out, stride=1, activation=torch.relu):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True)
        self.bn = nn.BatchNorm2d(c_out)
        self.activation = activation

    def forward(self, x):
        return self.activation(self.bn(self.conv(x)))


class PreActDenseLayer(nn.Module):
    """cat([x, conv(relu(bn(x)))]): a DenseNet-style layer of the user's own."""

    def __init__(self, c_in, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Residual(nn.Module):
    """conv -> BN -> ReLU plus the input: the chain fuses inside the traced forward."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + x


class DataDependent(nn.Module):
    """A forward that branches on the data: torch.fx cannot trace it, so it must be left alone."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.relu() if y.sum() > 0 else y


def handwritten():
    return nn.Sequential(
        ConvBNReLU(3, 8),
        BasicConv2d(8, 8, kernel_size=3, padding=1),  # torchvision Inception's unit: F.relu(inplace=True)
        PreActDenseLayer(8, 4),
        nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12), nn.ReLU(inplace=True)),
        Residual(12),
        DataDependent(12),
        nn.Conv2d(12, 6, 3, 2, 1), nn.BatchNorm2d(6),  # conv -> BN at the end of a Sequential
    )


# Tests ------------------------------------------------------------------------------------------------


def test_handwritten_patterns_are_fused_and_equal():
    eager, fast = eager_and_fast(handwritten())
    assert isinstance(fast[0], FastChainMixin) and isinstance(fast[0], ConvBNReLU)
    assert isinstance(fast[1], FastChainMixin) and isinstance(fast[1], BasicConv2d)
    assert isinstance(fast[2], FastChainMixin) and fast[2]._ranet_fast_plan.concat
    assert isinstance(fast[3], FastSequentialMixin) and isinstance(fast, FastSequentialMixin)
    assert isinstance(fast[4], FastGraphMixin) and isinstance(fast[4], Residual)
    assert type(fast[5]) is DataDependent
    report = fast.ranet_fast_report
    assert dict(report.replaced)["3"] == "bn-relu-conv-bn-relu (0, 1, 2, 3, 4)"
    assert dict(report.replaced)["4"] == "traced forward with conv-bn-relu (conv, bn, F.relu)"
    assert ("", "conv-bn (6, 7)") in report.replaced
    assert "torch.fx cannot trace its forward" in dict(report.left_alone)["5"]
    assert fast.ranet_fast_converted == {"chain": 2, "concat-chain": 1, "graph": 1, "conv-bn-relu": 3,
                                         "bn-relu-conv": 1, "bn-relu-conv-bn-relu": 1, "conv-bn": 1}
    check_state_dict(eager, fast)
    check_equivalent(eager, fast, image())


def test_handwritten_fused_paths_skip_the_children_in_eval_mode(monkeypatch):
    """The equality above must come from the fused op: in eval mode no conv module runs where a
    segment was planned (only the data-dependent block's, left alone)."""
    eager, fast = eager_and_fast(handwritten())
    fast.eval()
    calls = []
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: calls.append(self) or self._conv_forward(
        x, self.weight, self.bias))
    with torch.no_grad():
        fast(image())
    assert calls == [fast[5].conv]


def test_dense_concat_layer_writes_one_buffer_without_cat(monkeypatch):
    eager, fast = eager_and_fast(PreActDenseLayer(6, 3))
    eager.eval(), fast.eval()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = eager(x)
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("torch.cat in the eval-mode dense layer"))
    with torch.no_grad():
        y = fast(x)
    assert_close(y, expected, torch.float64, "output")
    assert y.is_contiguous(memory_format=torch.channels_last)


ACTIVATION_MODULES = {"silu": nn.SiLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "gelu": nn.GELU,
                      "leaky_relu": lambda: nn.LeakyReLU(0.2)}


@pytest.mark.parametrize("name", list(ACTIVATION_MODULES))
def test_every_activation_of_the_op_fuses_before_and_after_the_conv(name):
    """conv -> BN -> act (folded) and BN -> act -> conv -> BN -> act (one fused_conv2d with the
    activation in its prologue and epilogue) for each activation module the op computes; a
    functional activation other than ReLU in a traced forward is not recognised and runs after."""
    act = ACTIVATION_MODULES[name]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), act(),
                          nn.BatchNorm2d(8), act(), nn.Conv2d(8, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), act(),
                          ConvBNReLU(6, 8, activation=F.silu))
    eager, fast = eager_and_fast(model)
    assert isinstance(fast, FastSequentialMixin) and isinstance(fast[8], FastGraphMixin)
    assert fast.ranet_fast_converted == {f"conv-bn-{name}": 1, f"bn-{name}-conv-bn-{name}": 1, "conv-bn": 1,
                                         "graph": 1}
    assert dict(fast.ranet_fast_report.replaced)["8"] == "traced forward with conv-bn (conv, bn)"
    assert not fast.ranet_fast_report.left_alone
    check_equivalent(eager, fast, image())


def test_leaky_relus_with_two_slopes_leave_the_second_one_after_the_fused_call():
    """fused_conv2d has one negative_slope: BN -> LeakyReLU(0.1) -> conv -> BN -> LeakyReLU(0.3) fuses
    up to the second BN and runs the second LeakyReLU as it is."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.1), nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8),
                          nn.LeakyReLU(0.3))
    eager, fast = eager_and_fast(model)
    assert fast.ranet_fast_converted == {"bn-leaky_relu-conv-bn": 1}
    assert fast._ranet_fast_plan.items[-1] == "4"
    check_equivalent(eager, fast, image())


def test_resnet18():
    eager, fast = eager_and_fast(torchvision.models.resnet18(num_classes=10))
    report = fast.ranet_fast_report
    # The stem (conv1 -> bn1 -> relu in the model's own forward), each BasicBlock's two chains
    # (around the shortcut's add) and the downsample shortcuts (conv -> BN Sequentials) fuse.
    assert isinstance(fast, FastGraphMixin) and isinstance(fast.layer1[0], FastGraphMixin)
    assert dict(report.replaced)["layer1.0"] == "traced forward with conv-bn-relu (conv1, bn1, relu), conv-bn (conv2, bn2)"
    assert fast.ranet_fast_converted == {"graph": 9, "conv-bn-relu": 9, "conv-bn": 11}
    assert not report.left_alone
    check_state_dict(eager, fast)
    eager.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast(image()), eager(image()), torch.float64, "logits")
    # Gradients and a train step in float32 (test_float32_channels_last): float64 convolution
    # backward on the CPU is slow for a network this size.


def test_small_torchvision_densenet():
    eager, fast = eager_and_fast(small_densenet())
    assert type(fast.features.denseblock1) is FastDenseBlock
    assert type(fast.features.denseblock1.denselayer1) is FastDenseLayer
    assert isinstance(fast.features.transition1, FastSequentialMixin)  # norm -> relu -> conv, then the pool
    assert isinstance(fast.features, FastSequentialMixin)  # conv0 -> norm0 -> relu0 (7x7/2 stem)
    assert fast.ranet_fast_converted == {"FastDenseBlock": 2, "FastDenseLayer": 4, "bn-relu-conv": 1,
                                         "conv-bn-relu": 1}
    check_state_dict(eager, fast)
    check_equivalent(eager, fast, image())


def test_densenet_block_eval_uses_one_buffer(monkeypatch):
    eager, fast = eager_and_fast(small_densenet())
    eager.eval(), fast.eval()
    x = image(channels_last=True)
    with torch.no_grad():
        expected = eager(x)
    calls = []
    original_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or original_cat(*a, **k))
    with torch.no_grad():
        assert_close(fast(x), expected, torch.float64, "logits")
    assert calls == []


def test_densenet_layer_with_unexpected_children_is_left_alone():
    block = _DenseBlock(2, 6, bn_size=2, growth_rate=4, drop_rate=0)
    block.denselayer2.conv2 = nn.Conv2d(8, 4, 3, 1, 1, groups=2, bias=False)
    _, fast = eager_and_fast(nn.Sequential(block))
    assert type(fast[0]) is _DenseBlock and type(fast[0].denselayer1) is FastDenseLayer
    assert type(fast[0].denselayer2) is _DenseLayer
    reasons = dict(fast.ranet_fast_report.left_alone)
    assert "denselayer2: conv2: groups=2" in reasons["0"] and "conv2: groups=2" in reasons["0.denselayer2"]


def test_densenet_layer_with_dropout_in_train_mode_is_the_original():
    """Frozen BNs would allow the fused path, but dropout is active in train mode: the original runs."""
    torch.manual_seed(0)
    eager, fast = eager_and_fast(_DenseLayer(6, 4, 2, drop_rate=0.5))
    for model in (eager, fast):
        model.train()
        model.norm1.eval(), model.norm2.eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.manual_seed(3)
    expected = eager(x)
    torch.manual_seed(3)
    assert torch.equal(fast(x), expected)


def test_mobilenet_v3_small_folds_depthwise_convs_and_its_hardswish():
    eager, fast = eager_and_fast(torchvision.models.mobilenet_v3_small(num_classes=10))
    replaced = dict(fast.ranet_fast_report.replaced)
    assert fast.features[1].block[0][0].groups == 16 and replaced["features.1.block.0"] == "conv-bn-relu (0, 1, 2)"
    assert replaced["features.0"] == "conv-bn-hardswish (0, 1, 2)"
    reasons = dict(fast.ranet_fast_report.left_alone)
    assert reasons["features.1.block.1.fc1"] == "no BatchNorm2d (+ ReLU) pattern around it that convert recognises"
    convs = {id(m) for m in fast.modules() if isinstance(m, nn.Conv2d)}
    accounted = {id(fast.get_submodule(name)) for name in reasons if isinstance(fast.get_submodule(name), nn.Conv2d)}
    assert len(accounted) + sum(fast.ranet_fast_converted.values()) == len(convs)  # every conv: fused or explained
    check_state_dict(eager, fast)
    eager.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast(image()), eager(image()), torch.float64, "logits")
    eager32, fast32 = eager.float(), fast.float()  # gradients in float32: float64 backward is slow here
    check_equivalent(eager32, fast32, image(dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("name", ["resnet18", "densenet"])
def test_float32_channels_last(name):
    model = torchvision.models.resnet18(num_classes=10) if name == "resnet18" else small_densenet()
    eager, fast = eager_and_fast(model, torch.float32)
    x = image(4, torch.float32, channels_last=True)
    eager.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast(x), eager(x), torch.float32, "logits")
    check_equivalent(eager, fast, x, torch.float32)


def test_ranet_counts_and_equality():
    torch.manual_seed(0)
    eager, fast = eager_and_fast(RANet(ranet_config("cifar-c1", nChannels=4, growthRate=4, step=2)))
    assert set(fast.ranet_fast_converted) == {"FastBlockNormal", "FastBlockUpNormal", "FastConvBN", "FastConvBasic",
                                              "FastConvNormal", "FastConvUpNormal"}
    assert not fast.ranet_fast_report.left_alone  # every conv of a CIFAR RANet is fused
    check_state_dict(eager, fast)
    check_equivalent(eager, fast, image())


def test_imagenet_stem_is_fused():
    """The ImageNet stem of MSDNet and RANet (a plain Sequential: biased 7x7/2 conv, BN, ReLU,
    max-pool) fuses too: here MSDNet's first layer."""
    torch.manual_seed(0)
    args = msdnet_config("imagenet", nChannels=4)
    eager, fast = eager_and_fast(MSDNFirstLayer(3, 4, args))
    assert dict(fast.ranet_fast_report.replaced)["layers.0"] == "conv-bn-relu (0, 1, 2)"
    assert fast.ranet_fast_converted == {"conv-bn-relu": 1, "FastConvBasic": args.nScales - 1}
    check_equivalent(eager, fast, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_msdnet_blocks_are_converted_and_equal():
    torch.manual_seed(0)
    eager, fast = eager_and_fast(MSDNet(msdnet_config("cifar-batch", nBlocks=3, nChannels=8, growthRate=4,
                                                      data="cifar10")))
    counts = fast.ranet_fast_converted
    assert counts["FastMSDConvNormal"] > 0 and counts["FastConvDownNormal"] > 0 and counts["FastConvBasic"] > 0
    assert counts["conv-bn-relu"] > 0  # MSDNet's ConvBN is a Sequential of conv -> BN -> ReLU
    assert not fast.ranet_fast_report.left_alone
    assert not any(type(m) in (ranet_fast.models.msdnet.ConvNormal, ranet_fast.models.msdnet.ConvDownNormal)
                   for m in fast.modules())
    check_state_dict(eager, fast)
    check_equivalent(eager, fast, image(channels_last=True))
    assert ranet_fast.count_flops(fast, 32) == ranet_fast.count_flops(eager, 32)


def test_msdnet_units_write_one_buffer_without_cat(monkeypatch):
    torch.manual_seed(0)
    eager, fast = eager_and_fast(MSDNet(msdnet_config("cifar-batch", nBlocks=2, nChannels=8, growthRate=4,
                                                      data="cifar10")))
    eager.eval(), fast.eval()
    assert any(type(m) is FastConvDownNormal for m in fast.modules())
    assert any(type(m) is FastMSDConvNormal for m in fast.modules())
    x = image()
    with torch.no_grad():
        expected = eager(x)
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("torch.cat in an eval-mode MSDNet unit"))
    with torch.no_grad():
        assert_close(fast(x), expected, torch.float64, "logits")


def test_converting_twice_changes_nothing():
    _, fast = eager_and_fast(small_densenet())
    classes = [type(m) for m in fast.modules()]
    plans = {name: m._ranet_fast_plan for name, m in fast.named_modules() if hasattr(m, "_ranet_fast_plan")}
    report = fast.ranet_fast_report
    ranet_fast.convert(fast)
    assert [type(m) for m in fast.modules()] == classes
    assert {name: m._ranet_fast_plan for name, m in fast.named_modules() if hasattr(m, "_ranet_fast_plan")} == plans
    assert fast.ranet_fast_report == report and fast.ranet_fast_report.replaced


def test_verbose_prints_the_report(capsys):
    ranet_fast.convert(handwritten(), verbose=True)
    printed = capsys.readouterr().out
    assert printed.startswith("ranet_fast.convert: 6 replaced, 1 left alone")
    assert "replaced    2: cat([x, bn-relu-conv (bn, relu, conv)], 1)" in printed
    assert "left alone  5: DataDependent: torch.fx cannot trace its forward" in printed


def test_pickle_round_trip():
    eager, fast = eager_and_fast(handwritten())
    restored = pickle.loads(pickle.dumps(fast))
    assert type(restored[0]) is type(fast[0]) and restored[0]._ranet_fast_plan.current(restored[0])
    eager.eval(), restored.eval()
    with torch.no_grad():
        assert_close(restored(image()), eager(image()), torch.float64, "unpickled output")


def test_hooks_on_a_fused_child_still_fire():
    eager, fast = eager_and_fast(handwritten())
    eager.eval(), fast.eval()
    seen = []
    fast[3][2].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        assert_close(fast(image()), eager(image()), torch.float64, "output with a hook")
    assert seen == [torch.Size([2, 12, 32, 32])]  # a hooked child makes its segment run eagerly


def test_frozen_batchnorm_in_a_training_model_is_folded_with_gradients():
    """Fine-tuning with frozen BN (BN in eval mode inside a model in train mode): the fused,
    differentiable path, equal gradients."""
    eager, fast = eager_and_fast(handwritten())
    for model in (eager, fast):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    check_backward(eager, fast, image().requires_grad_(), image().requires_grad_(), torch.float64, "frozen BN")


def test_replacing_a_child_after_convert_voids_the_plan():
    eager, fast = eager_and_fast(handwritten())
    eager.eval(), fast.eval()
    for model in (eager, fast):
        model[3][2] = nn.Conv2d(12, 12, 1, bias=False).double()
    fast[3][2].load_state_dict(eager[3][2].state_dict())
    with torch.no_grad():
        assert_close(fast(image()), eager(image()), torch.float64, "output after replacing a child")


# The report: per candidate chain, fused or not and why ----------------------------------------------


def report_model():
    """A folded conv -> BN -> SiLU, a fused BN -> ReLU -> conv, and a dilated conv after a BN before
    it (a pattern the op does not compute: left alone)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.SiLU(),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.MaxPool2d(1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, 1, 2, dilation=2))


@pytest.mark.parametrize("faster", ["fused", "eager"])
def test_report_says_which_path_won_and_the_model_runs_it(tuned, monkeypatch, faster):
    """With the dispatch measuring the ``faster`` path faster (timings forced), convert's example call
    makes the choice, the report names it with the timings (fused, or original because fusion did
    not pay, the module then given its original class back), the model then runs that path, and
    outputs stay exact; the unsupported conv is reported left alone with its reason."""
    from ranet_fast import dispatch
    from ranet_fast.nn import generic

    seconds = {"fused": 2e-3, "eager": 1e-3} if faster == "eager" else {"fused": 1e-3, "eager": 2e-3}
    monkeypatch.setattr(dispatch, "measure", lambda candidates, device: dict(seconds))
    eager = report_model().double().eval()
    randomize_bn(eager, 0)
    x = image()
    with torch.no_grad():
        fast, report = ranet_fast.convert(copy.deepcopy(eager), report=True, example_inputs=(x,))
    statuses = {(s.module, s.pattern): s for s in report.chains()}
    chains = [s for s in statuses.values() if s.outcome != "left alone"]
    assert [s.pattern for s in chains] == ["conv-bn-silu (0, 1, 2)", "bn-relu-conv (3, 4, 5)"]
    for status in chains:
        if faster == "fused":
            assert (status.outcome, status.category) == ("fused", None)
            assert "fused 1000 us, original 2000 us" in status.reason
        else:
            assert (status.outcome, status.category) == ("original", "did not pay")
            assert status.reason.endswith("fusion did not pay (fused 2000 us, original 1000 us); "
                                          "the original module was kept")
    left = [s for s in statuses.values() if s.outcome == "left alone"]
    assert [(s.module, s.category) for s in left] == [("9", "unsupported")] and "dilat" in left[0].reason
    assert "fusion did not pay" in str(report) if faster == "eager" else "[fused:" in str(report)
    calls = []
    original = generic.run_segment
    monkeypatch.setattr(generic, "run_segment", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        assert_close(fast(x), eager(x), torch.float64, "output")
    assert len(calls) == (2 if faster == "fused" else 0)
    # Where the original won, convert gave the module its class back: nothing is decided per call.
    assert (type(fast) is nn.Sequential) == (faster == "eager")


@pytest.mark.parametrize("model_faster", ["fused", "eager"])
def test_the_whole_model_keeps_its_fusions_only_where_they_win_in_place(tuned, monkeypatch, model_faster):
    """Every chain measured faster fused alone; the example call of the whole model then decides:
    where the chosen fusions do not win by the margin in place, every fast module gets its original
    class back and the report says why, with both times; where they win, they stay."""
    from ranet_fast import dispatch
    import importlib

    convert_module = importlib.import_module("ranet_fast.nn.convert")  # the module, not the function it exports

    monkeypatch.setattr(dispatch, "measure", lambda candidates, device: {"fused": 1e-3, "eager": 2e-3})
    whole = {"fused": 4e-3, "eager": 3e-3} if model_faster == "eager" else {"fused": 3e-3, "eager": 4e-3}
    measured = []
    monkeypatch.setattr(convert_module, "measure_chosen_against_original",
                        lambda model, inputs: measured.append((model, inputs)) or dict(whole))
    eager = report_model().double().eval()
    randomize_bn(eager, 0)
    x = image()
    with torch.no_grad():
        fast, report = ranet_fast.convert(copy.deepcopy(eager), report=True, example_inputs=(x,))
    assert measured == [(fast, (x,))]
    assert report.model_seconds == whole
    chains = [s for s in report.chains() if s.outcome != "left alone"]
    assert len(chains) == 2
    if model_faster == "eager":
        assert report.reverted_by_model_check == [""]  # the model itself holds both chains
        for status in chains:
            assert (status.outcome, status.category) == ("original", "did not pay")
            assert status.reason.endswith("the whole model was not faster with its chosen fusions (example call: "
                                          "4 ms, original 3 ms): the original module was kept")
        assert type(fast) is nn.Sequential
        assert "whole model, example call: 4 ms with the chosen fusions, 3 ms original (original modules kept)" \
            in str(report)
    else:
        assert report.reverted_by_model_check == []
        assert [s.outcome for s in chains] == ["fused", "fused"]
        assert type(fast) is not nn.Sequential
        assert "(fused modules kept)" in str(report)
    with torch.no_grad():
        assert_close(fast(x), eager(x), torch.float64, "output")


def test_the_whole_model_timing_leaves_no_trace_and_is_skipped_without_tuning(tuned):
    """measure_chosen_against_original times a training step (forward and backward) of a converted
    model both ways without changing its BN running statistics or leaving gradients; with tuning
    off it measures nothing."""
    from ranet_fast import dispatch
    from ranet_fast.nn.common import measure_chosen_against_original

    fast = ranet_fast.convert(report_model().double().train())
    x = image()
    before = copy.deepcopy(fast.state_dict())
    seconds = measure_chosen_against_original(fast, (x,))
    assert set(seconds) == {"fused", "eager"} and all(value > 0 for value in seconds.values())
    for name, value in fast.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in fast.parameters())
    with dispatch.tuning(False):
        assert measure_chosen_against_original(fast, (x,)) is None


def test_report_before_any_call_and_for_a_call_without_a_fused_form(tuned):
    """Before the first call the report says so; after a train-mode call (BatchNorm in train mode:
    nothing folds) it says the original forward ran and why, and names the call."""
    eager = report_model().double()
    fast, report = ranet_fast.convert(copy.deepcopy(eager), report=True)
    chains = [s for s in report.chains() if s.outcome != "left alone"]
    assert [s.outcome for s in chains] == ["not run", "not run"]
    x = image()
    assert_close(fast(x), eager(x), torch.float64, "train-mode output")
    for status in (s for s in report.chains() if s.outcome != "left alone"):
        assert (status.outcome, status.category) == ("original", "no fused form")
        assert status.reason == "train, input [2, 3, 32, 32] float64: original, no fused form for this call"


def test_known_fast_classes_get_their_class_back_where_the_original_won(tuned, monkeypatch):
    """RANet's fast layers (known classes) measured slower than their official forwards: after the
    example call every one is its official class again, and the logits are the official ones."""
    from ranet_fast import dispatch
    from ranet_fast.models import ranet

    monkeypatch.setattr(dispatch, "measure", lambda candidates, device: {"fused": 2e-3, "eager": 1e-3})
    eager = RANet(ranet_config("cifar-c1", nChannels=4, growthRate=4, step=2)).double().eval()
    randomize_bn(eager, 0)
    x = image()
    with torch.no_grad():
        fast, report = ranet_fast.convert(copy.deepcopy(eager), report=True, example_inputs=(x,))
        official = {ranet.ConvBasic, ranet.ConvBN, ranet.ConvNormal, ranet._BlockNormal, ranet.ConvUpNormal,
                    ranet._BlockUpNormal}
        assert {type(report.modules[name]) for name, _ in report.replaced} <= official
        for got, expected in zip(fast(x), eager(x)):
            assert_close(got, expected, torch.float64, "logits")


def test_folded_conv_cache_is_reused_and_invalidated():
    """The eval-mode conv -> BN -> act of a converted Sequential keeps its folded weight and bias while
    nothing they come from changes, and folds again after each kind of change."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, groups=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    eager, fast = eager_and_fast(model)
    eager.eval(), fast.eval()
    x = image()

    def check(dtype=torch.float64):
        with torch.no_grad():
            assert_close(fast(x.to(dtype)), eager(x.to(dtype)), dtype, "eval output")

    check()
    cached = fast._ranet_fast_folded_conv["0"][2]
    check()
    assert fast._ranet_fast_folded_conv["0"][2] is cached  # nothing changed: no refold
    changes = (lambda m: m[0].weight.mul_(-1), lambda m: m[0].bias.add_(0.5), lambda m: m[1].running_mean.add_(1),
               lambda m: m[1].running_var.mul_(2), lambda m: m[1].weight.mul_(-1), lambda m: m[1].bias.add_(0.5))
    for change in changes:
        with torch.no_grad():
            change(eager), change(fast)
        check()
        assert fast._ranet_fast_folded_conv["0"][2] is not cached
        cached = fast._ranet_fast_folded_conv["0"][2]
    for m in (eager, fast):  # a replaced tensor, a new eps
        m[1].running_var = m[1].running_var * 3
    check()
    for m in (eager, fast):
        m[1].eps = 0.5
    check()
    eager.float(), fast.float()  # .data swapped by the module's conversion: a new data pointer
    check(torch.float32)
