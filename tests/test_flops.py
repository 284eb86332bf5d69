"""count_flops against the official op_counter's figures."""

import pytest
import torch
import torch.nn as nn

from golden.common import NOTES_MFLOPS as OFFICIAL_MFLOPS
from golden.common import NOTES_MPARAMS as OFFICIAL_MPARAMS
import ranet_fast
from ranet_fast import count_flops
from ranet_fast.models import RANet, ranet_config


def image_size(args):
    return 224 if args.data == "ImageNet" else 32


@pytest.mark.parametrize("name", sorted(OFFICIAL_MFLOPS))
def test_flops_match_official_figures(name):
    args = ranet_config(name)
    flops = count_flops(RANet(args), image_size(args))
    assert len(flops) == args.num_exits == len(OFFICIAL_MFLOPS[name])
    for measured, official in zip(flops, OFFICIAL_MFLOPS[name]):
        assert measured / 1e6 == pytest.approx(official, rel=5e-3)
    assert flops == sorted(flops), "cumulative FLOPs must grow from exit to exit"


@pytest.mark.parametrize("name", sorted(OFFICIAL_MPARAMS))
def test_parameter_count_matches_official(name):
    model = RANet(ranet_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(OFFICIAL_MPARAMS[name], abs=0.005)


def test_count_flops_leaves_model_unchanged():
    model = RANet(ranet_config("cifar-c1")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, 32)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN statistics or weights changed"
    assert not any(m._forward_hooks for m in model.modules()), "hooks left behind"


def test_count_flops_by_hand_on_a_tiny_exit_network():
    class TwoExits(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            self.classifier = nn.ModuleList([
                nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)),
                nn.Sequential(nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)),
            ])

        def forward(self, x):
            h = self.body(x)
            return [head(h) for head in self.classifier]

    conv = 3 * 4 * 9 * 8 * 8
    relu = 4 * 8 * 8
    first = conv + relu + 4 * 4 * 4 * 4 + (64 * 5 + 5)
    second = first + 4 * 2 * 2 * 16 + (16 * 5 + 5)
    assert count_flops(TwoExits(), 8) == [first, second]


def test_unknown_leaf_module_is_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.GELU()
            self.classifier = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))])

        def forward(self, x):
            return [self.classifier[0](self.act(x))]

    with pytest.raises(TypeError, match="GELU"):
        count_flops(Odd(), 4)


@pytest.mark.parametrize("name", ["cifar-c1", "cifar-c3"])
def test_converted_model_counts_the_same_flops(name):
    """Fast layers skip their submodules in eval mode; counting must still see every conv."""
    model = RANet(ranet_config(name))
    expected = count_flops(model, 32)
    assert count_flops(ranet_fast.convert(model), 32) == expected
