"""Early exits on a backbone from torchvision, timm or your own code: :func:`attach_exits`.

The backbone's forward must run its top-level children one after another up to the last exit
point (ResNets, VGG, RegNets, timm's ResNets and most ``forward_features`` of timm do; a child
that is a plain ``nn.Sequential``, like torchvision's ``features``, may be entered, so that an exit
goes after one of its children). This is proven with ``torch.fx`` (the forward traced with its
children as single calls) before anything is moved: a backbone whose forward does something else
between those children (an add, a reshape) is refused with the graph in the message.

The result, :class:`EarlyExitBackbone`, holds the backbone's modules in stages (``stages[k]``:
from after exit ``k - 1`` through the module exit ``k`` follows, an ``nn.Sequential`` keeping the
modules' own names, with dots as underscores) and one classifier per exit (global average pool,
flatten, linear). What came after the last exit point (the backbone's own pooling and head) is
dropped. It implements the staged interface of :mod:`ranet_fast.inference.early_exit`, so
``early_exit``, ``exit_flops``, ``calibrate_thresholds``, the trainer's loop and
:func:`ranet_fast.convert` (which fuses the conv/BN chains of the stages like any Sequential's)
work on it. Load pretrained weights into the backbone before attaching: the modules keep their
parameters, but their state_dict keys become ``stages.K.NAME...``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn as nn

from .patterns import trace_own_forward


def _call_order(backbone: nn.Module) -> list[str]:
    """The children the backbone's forward calls, in order, while each call takes the previous one's
    result (the input for the first) and nothing else happens; the order stops at the first node
    that is not such a call."""
    try:
        graph = trace_own_forward(backbone)
    except Exception as error:  # any failure to trace means: not provable
        raise ValueError(f"attach_exits: torch.fx cannot trace {type(backbone).__name__}.forward "
                         f"({type(error).__name__}: {error})") from None
    order, previous = [], None
    for node in graph.nodes:
        if node.op == "placeholder" and previous is None:
            previous = node
        elif (node.op == "call_module" and node.target in backbone._modules and node.args == (previous,)
              and not node.kwargs and len(previous.users) == 1):
            order.append(node.target)
            previous = node
        else:
            break
    return order


def _stage_modules(backbone: nn.Module, after: Sequence[str]) -> list[list[tuple[str, nn.Module]]]:
    order = _call_order(backbone)
    flat: list[tuple[str, nn.Module]] = []  # (dotted name, module) in call order
    for child in order:
        module = backbone._modules[child]
        if type(module) is nn.Sequential and any(a.startswith(child + ".") for a in after):
            flat += [(f"{child}.{name}", m) for name, m in module.named_children()]
        else:
            flat.append((child, module))
    names = [name for name, _ in flat]
    stages, start = [], 0
    for point in after:
        if point not in names[start:]:
            raise ValueError(
                f"attach_exits: {point!r} is not among the modules {type(backbone).__name__}.forward calls one after "
                f"another after the previous exit (in order: {', '.join(names) or 'none'}); exits must be in call "
                "order, after a top-level child or a child of a top-level nn.Sequential")
        end = names.index(point, start) + 1
        stages.append(flat[start:end])
        start = end
    return stages


def _output_channels(stages: nn.ModuleList, input_shape: Sequence[int]) -> list[int]:
    """The channels after each stage, from one eval-mode forward of zeros (BN statistics unchanged)."""
    modes = [m.training for m in stages.modules()]
    stages.eval()
    channels = []
    try:
        parameter = next(stages.parameters(), None)
        x = torch.zeros(1, *input_shape, dtype=parameter.dtype if parameter is not None else torch.float32,
                        device=parameter.device if parameter is not None else None)
        with torch.no_grad():
            for stage in stages:
                x = stage(x)
                if x.dim() != 4:
                    raise ValueError(f"attach_exits: a stage returns shape {tuple(x.shape)}, not [N, C, H, W]")
                channels.append(x.shape[1])
    finally:
        for module, mode in zip(stages.modules(), modes):
            module.training = mode
    return channels


class EarlyExitBackbone(nn.Module):
    """A backbone cut into stages with a classifier after each (see the module docstring)."""

    def __init__(self, stages: nn.ModuleList, classifier: nn.ModuleList):
        super().__init__()
        self.stages = stages
        self.classifier = classifier  # count_flops marks one exit per classifier module

    @property
    def num_exits(self) -> int:
        return len(self.classifier)

    def early_exit_start(self, x: torch.Tensor) -> dict:
        return {"features": x}

    def early_exit_stage(self, k: int, state: dict) -> tuple[torch.Tensor, dict]:
        features = self.stages[k](state["features"])
        logits = self.classifier[k](features)
        return logits, ({"features": features} if k < self.num_exits - 1 else {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state, outputs = self.early_exit_start(x), []
        for k in range(self.num_exits):
            logits, state = self.early_exit_stage(k, state)
            outputs.append(logits)
        return outputs


def attach_exits(backbone: nn.Module, after: Sequence[str], num_classes: int,
                 input_shape: Sequence[int] = (3, 32, 32)) -> EarlyExitBackbone:
    """A multi-exit network from ``backbone``: an exit after each module named in ``after`` (in call order).

    Args:
        backbone: a module whose forward calls its children in sequence up to the last exit point
            (checked with torch.fx). Its modules move into the result; do not use it afterwards.
        after: names of the modules each exit follows, e.g. ``["layer1", "layer2", "layer3", "layer4"]``
            for a ResNet or ``["features.3", "features.8"]`` inside a top-level ``nn.Sequential``.
        num_classes: classes of every exit's linear classifier.
        input_shape: (C, H, W) of one input, for the one forward that finds each stage's channels.
    """
    if not after:
        raise ValueError("attach_exits: give at least one module to put an exit after")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"attach_exits: num_classes must be a positive int, got {num_classes!r}")
    stages = nn.ModuleList(nn.Sequential(OrderedDict((name.replace(".", "_"), module) for name, module in stage))
                           for stage in _stage_modules(backbone, list(after)))
    parameter = next(stages.parameters(), None)
    factory = {} if parameter is None else {"dtype": parameter.dtype, "device": parameter.device}
    classifier = nn.ModuleList(
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes, **factory))
        for channels in _output_channels(stages, input_shape))
    return EarlyExitBackbone(stages, classifier)
