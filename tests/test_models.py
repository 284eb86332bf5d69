"""RANet parity with the official implementation, through golden data it produced.

tests/golden/ holds, for every paper configuration (plus the official README's 'lg' command and a
CIFAR-100 variant), what the official RANet-pytorch code computed for fixed weights and inputs:
its state_dict layout, per-exit logits in eval and train mode, running statistics after one
train-mode forward and op_counter FLOPs. The weights are regenerated here from the recorded layout.
"""

import argparse

import pytest
import torch

from golden.common import (CONFIGS, INIT_SEED, INITIAL_WEIGHTS_PATH, assert_eval_logits_match,
                           assert_train_forward_matches, golden_input, golden_weights, image_size, load_golden,
                           make_args, state_dict_fingerprint)
from ranet_fast import count_flops
from ranet_fast.models import RANet, ranet_config, validate_args

NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def golden_case(request):
    """One model per configuration (building the ImageNet ones is the slow part), its golden data
    and the recorded weights; each test loads the weights afresh before using the model."""
    name = request.param
    golden = load_golden(name)
    layout, weights = golden_weights(golden)
    args = make_args(name)
    model = RANet(args)
    assert args.num_exits == golden["num_exits"]
    return name, golden, layout, weights, model


def test_state_dict_layout_is_official(golden_case):
    name, golden, layout, _, model = golden_case
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == layout


def test_eval_logits_equal_official(golden_case):
    name, golden, _, weights, model = golden_case
    model.load_state_dict(weights, strict=True)
    assert_eval_logits_match(model, golden, golden_input(name))


def test_train_logits_and_running_statistics_equal_official(golden_case):
    name, golden, _, weights, model = golden_case
    model.load_state_dict(weights, strict=True)
    assert_train_forward_matches(model, golden, golden_input(name))


def test_flops_equal_official_op_counter(golden_case):
    name, golden, _, _, model = golden_case
    for ours, official in zip(count_flops(model, image_size(name)), golden["flops"]):
        assert ours == pytest.approx(official, rel=1e-9)


@pytest.mark.parametrize("name", ["cifar-c1", "cifar-c2", "cifar-c3", "imagenet-1", "imagenet-2"])
def test_ranet_config_matches_paper_flags(name):
    ours = vars(ranet_config(name))
    official = CONFIGS[name]
    for field, value in official.items():
        assert ours[field] == value, field


def test_ranet_config_overrides_data_set_and_classes():
    args = ranet_config("cifar-c3", data="cifar100")
    assert args.num_classes == 100
    model = RANet(args)
    assert all(head.linear.out_features == 100 for head in model.classifier)
    assert ranet_config("cifar-c1", data="synthetic", num_classes=7).num_classes == 7
    assert ranet_config("cifar-c1", grFactor="4-2-1").grFactor == [4, 2, 1]


def test_exit_counts():
    expected = {"cifar-c1": 6, "cifar-c2": 8, "cifar-c3": 8, "imagenet-1": 8, "imagenet-2": 8}
    for name, exits in expected.items():
        args = ranet_config(name)
        if args.data == "ImageNet":  # count without building the large model
            from ranet_fast.models import plan_blocks
            assert sum(not b.fusion for flow in plan_blocks(args) for b in flow) == exits
        else:
            RANet(args)
            assert args.num_exits == exits


@pytest.mark.parametrize("name", sorted(torch.load(INITIAL_WEIGHTS_PATH, weights_only=True)))
def test_same_seed_gives_the_official_initial_weights(name):
    official = torch.load(INITIAL_WEIGHTS_PATH, weights_only=True)[name]
    torch.manual_seed(INIT_SEED)
    state = RANet(make_args(name)).state_dict()
    assert torch.equal(state_dict_fingerprint(state, list(state)), official)


@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(batch):
    model = RANet(ranet_config("cifar-c1")).eval()
    with torch.no_grad():
        logits = model(torch.randn(batch, 3, 32, 32))
    assert [tuple(l.shape) for l in logits] == [(batch, 10)] * 6


def test_channels_last_and_non_contiguous_inputs_give_the_same_logits():
    model = RANet(ranet_config("cifar-c1")).eval().double()
    strided = torch.randn(1, 6, 32, 32, dtype=torch.float64)[:, ::2]
    assert not strided.is_contiguous()
    with torch.no_grad():
        expected = model(strided.contiguous())
        for variant in (strided, strided.contiguous(memory_format=torch.channels_last)):
            for ours, ref in zip(model(variant), expected):
                torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter():
    model = RANet(ranet_config("cifar-c1"))
    sum(l.square().mean() for l in model(torch.randn(2, 3, 32, 32))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def _flags(**changes):
    args = ranet_config("cifar-c1")
    for k, v in changes.items():
        setattr(args, k, v)
    args.nScales = len(args.grFactor)  # as the official args.py derives it
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(grFactor=[4, 2], bnFactor=[4, 2]), "same number of entries"),
    (dict(bnFactor=[4, 2, 1, 1]), "same number of entries"),
    (dict(scale_list=[2, 2, 3]), "--scale-list must be 1"),
    (dict(scale_list=[1, 3, 4]), "grow by 0 or 1"),
    (dict(scale_list=[1, 1, 2]), "entries >= 2"),
    (dict(stepmode="log"), "--stepmode"),
    (dict(step=0), "--step"),
    (dict(data="mnist"), "--data"),
    (dict(compress_factor=1.0), "--compress-factor"),
    (dict(nBlocks=1, block_step=0, scale_list=[1, 2, 3]), "down-sampling blocks"),
    (dict(scale_list=[1, 2], grFactor=[2, 1], bnFactor=[2, 1]), "reaches them at 16x16"),
    (dict(scale_list=[1, 2, 3, 4], grFactor=[4, 2, 1, 1], bnFactor=[4, 2, 1, 1]), "reaches them at 4x4"),
])
def test_inconsistent_flags_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        validate_args(_flags(**changes))
    with pytest.raises(ValueError, match=message):
        RANet(_flags(**changes))


def test_unknown_configuration_name():
    with pytest.raises(ValueError, match="cifar-c9"):
        ranet_config("cifar-c9")


def test_accepts_official_namespace_without_num_classes():
    fields = {k: v for k, v in CONFIGS["cifar-c1"].items() if k != "num_classes"}
    args = argparse.Namespace(**fields, data_root="x")
    model = RANet(args)
    assert model.classifier[0].linear.out_features == 10
