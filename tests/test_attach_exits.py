"""ranet_fast.nn.attach_exits: exits on torchvision and timm backbones, the staged interface, refusals."""

import pytest
import torch
import torchvision

import ranet_fast
from ranet_fast.inference import early_exit
from ranet_fast.nn import EarlyExitBackbone, attach_exits
from model_testing import randomize_bn


def test_resnet_stages_run_the_backbone_computation():
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=10).double()
    randomize_bn(backbone)
    backbone.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        features = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(
            backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))))))
    model = attach_exits(backbone, ["layer2", "layer4"], num_classes=7)
    assert isinstance(model, EarlyExitBackbone) and model.num_exits == 2
    assert [c[2].in_features for c in model.classifier] == [128, 512]
    assert list(model.stages[1]._modules) == ["layer3", "layer4"]
    model.eval()
    with torch.no_grad():
        logits = model(x)
        expected = model.classifier[1](features)
    assert [tuple(t.shape) for t in logits] == [(2, 7), (2, 7)]
    torch.testing.assert_close(logits[1], expected, rtol=1e-12, atol=1e-12)


def test_converted_exits_equal_and_early_exit_with_everybody_leaving_last_is_the_full_network():
    torch.manual_seed(0)
    eager = attach_exits(torchvision.models.mobilenet_v2().double(), ["features.3", "features.18"], 10)
    randomize_bn(eager)
    fast = ranet_fast.convert(attach_exits(torchvision.models.mobilenet_v2().double(), ["features.3", "features.18"],
                                           10))
    fast.load_state_dict(eager.state_dict(), strict=True)
    eager.eval(), fast.eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for ours, theirs in zip(fast(x), eager(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * theirs.abs().max().item())
        result = early_exit(fast, x, [float("inf"), 0.0], count_flops_spent=False)
        torch.testing.assert_close(result.logits, fast(x)[-1])
    assert result.exit_counts == [0, 3]


def test_timm_backbone():
    timm = pytest.importorskip("timm", reason="timm is not installed (a test dependency: pip install timm)")
    model = attach_exits(timm.create_model("resnet18", pretrained=False), ["layer1", "layer3"], 5)
    assert model.num_exits == 2 and [c[2].in_features for c in model.classifier] == [64, 256]


@pytest.mark.parametrize("after, message", [
    (["fc"], "'fc' is not among the modules ResNet.forward calls one after another"),
    (["layer3", "layer2"], "'layer2' is not among"),
    ([], "at least one module"),
])
def test_bad_exit_points_are_refused(after, message):
    with pytest.raises(ValueError, match=message):
        attach_exits(torchvision.models.resnet18(), after, 10)


def test_num_classes_is_checked():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        attach_exits(torchvision.models.resnet18(), ["layer1"], 0)
