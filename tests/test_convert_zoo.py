"""ranet_fast.convert on CNNs it was not written for: torchvision's and timm's, one per family.

For every model of ``benchmarks.convert.ZOO`` (random weights, random BN statistics and affine
parameters) the converted copy must equal the eager model: eval outputs in float64 to 1e-12 and in
float32 to 1e-5 (of the largest logit), and one float64 training step (the loss, the gradient of
every parameter and of the input, the BN running statistics). Its state_dict keys stay, and its
report accounts for every conv: fused in a chain, or left alone with a reason. timm is a test
dependency: its models skip without it (a skip that fails a CI run, tests/conftest.py).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ranet_fast
from benchmarks.convert import ZOO, fused_segments
from model_testing import randomize_bn

SIZE = 64  # eval input: small, and every model keeps a spatial map through its last stage
TRAIN_SIZE = 32  # the float64 training step (its backward is slow on a CPU) on the smallest input that trains


def relative_error_at_most(ours, theirs, tolerance, what):
    scale = max(theirs.abs().max().item(), 1e-30)
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"{what}: {m}")


def build(name):
    entry = ZOO[name]
    if entry.library == "timm":
        pytest.importorskip("timm", reason="timm is not installed (a test dependency: pip install timm)")
    torch.manual_seed(0)
    eager = entry.build().double()
    randomize_bn(eager, seed=1)
    return eager, ranet_fast.convert(copy.deepcopy(eager))


def check_report(name, eager, fast):
    report = fast.ranet_fast_report
    convs = {qualified for qualified, m in fast.named_modules() if isinstance(m, nn.Conv2d)}
    explained = {module for module, _ in report.left_alone}
    segments = fused_segments(fast.ranet_fast_converted)
    # Every conv is fused (in one segment each) or explained, by its own entry or its parent's.
    unexplained = [c for c in convs if c not in explained and c.rpartition(".")[0] not in explained]
    assert len(unexplained) >= segments, (name, segments, len(unexplained))
    assert all(reason for _, reason in report.left_alone)
    if ZOO[name].has_batch_norm:
        assert segments > 0, (name, report)
    else:
        assert segments == 0 and not report.replaced and len(report.left_alone) >= len(convs)


def train_step(model, x, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(5)  # the same dropout and stochastic-depth draws for both models
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    return loss, x.grad


@pytest.mark.parametrize("name", list(ZOO))
def test_converted_zoo_model_is_exact(name):
    eager, fast = build(name)
    assert list(fast.state_dict()) == list(eager.state_dict())
    check_report(name, eager, fast)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64, generator=generator)

    eager.eval(), fast.eval()
    with torch.no_grad():
        relative_error_at_most(fast(x), eager(x), 1e-12, f"{name} eval float64")

    batch = torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE, dtype=torch.float64, generator=generator)
    labels = torch.tensor([3, 7])
    loss, grad_x = train_step(eager, batch, labels)
    fast_loss, fast_grad_x = train_step(fast, batch, labels)
    relative_error_at_most(fast_loss, loss, 1e-12, f"{name} train loss")
    relative_error_at_most(fast_grad_x, grad_x, 1e-12, f"{name} input gradient")
    fast_parameters = dict(fast.named_parameters())
    largest = max(p.grad.abs().max().item() for p in eager.parameters() if p.grad is not None)
    for parameter_name, p in eager.named_parameters():
        theirs, ours = p.grad, fast_parameters[parameter_name].grad
        assert (ours is None) == (theirs is None), parameter_name
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * largest,
                                       msg=lambda m: f"{name} gradient of {parameter_name}: {m}")
    fast_state = fast.state_dict()
    for key, value in eager.state_dict().items():  # the running statistics the step updated
        if value.is_floating_point():
            relative_error_at_most(fast_state[key], value, 1e-12, f"{name} {key}")
        else:
            assert torch.equal(fast_state[key], value), key

    eager.float().eval(), fast.float().eval()
    with torch.no_grad():
        relative_error_at_most(fast(x.float()), eager(x.float()), 1e-5, f"{name} eval float32")


def test_the_zoo_spans_twenty_families_and_most_have_batch_norm_to_fuse():
    families = {(model.library, model.family) for model in ZOO.values()}
    assert len(ZOO) >= 20 and len({family for _, family in families}) >= 20
    assert {library for library, _ in families} == {"torchvision", "timm"}
    # Each model with BN must show fused chains (test above), so this bounds the fused share from below.
    assert sum(model.has_batch_norm for model in ZOO.values()) >= 0.8 * len(ZOO)
