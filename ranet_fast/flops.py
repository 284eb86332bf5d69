"""FLOPs per exit with the semantics of the official RANet/MSDNet ``op_counter``.

The official counter charges, for one image (batch 1):

* Conv2d: ``in/groups * out * kh * kw * out_h * out_w`` multiply-adds (bias not counted);
* Linear: ``weight.numel() + bias.numel()``;
* ReLU: one op per input element;
* AvgPool2d / MaxPool2d: ``kh * kw`` per output element; AdaptiveAvgPool2d: one per input element;
* BatchNorm, dropout, resizing and concatenation: nothing.

Each exit's figure is cumulative: everything computed up to and including that exit's classifier,
earlier classifiers included. Counting is done with forward hooks on the leaf modules, so a module
type without a rule is reported instead of being silently skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn


def _conv_flops(m: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return (m.in_channels // m.groups) * m.out_channels * kh * kw * y[:, 0].numel()


def _linear_flops(m: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> int:
    bias = m.bias.numel() if m.bias is not None else 0
    return (m.weight.numel() + bias) * (x.numel() // x.shape[-1])


def _pool_flops(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    kh, kw = (m.kernel_size, m.kernel_size) if isinstance(m.kernel_size, int) else m.kernel_size
    return y.numel() * kh * kw


def _input_elements(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return x.numel()


FlopRule = Callable[[nn.Module, torch.Tensor, torch.Tensor], int]

# Leaf module types and their cost; subclasses match too. Fast layers register theirs here.
FLOP_RULES: dict[type, FlopRule] = {
    nn.Conv2d: _conv_flops,
    nn.Linear: _linear_flops,
    nn.ReLU: _input_elements,
    nn.AvgPool2d: _pool_flops,
    nn.MaxPool2d: _pool_flops,
    nn.AdaptiveAvgPool2d: _input_elements,
}
FREE_MODULES: tuple[type, ...] = (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


def _rule_for(module: nn.Module) -> FlopRule | None:
    for kind, rule in FLOP_RULES.items():
        if isinstance(module, kind):
            return rule
    if isinstance(module, FREE_MODULES):
        return None
    raise TypeError(f"count_flops has no FLOP rule for leaf module type {type(module).__name__}; "
                    "add one to ranet_fast.flops.FLOP_RULES")


def count_flops(model: nn.Module, image_size: int | tuple[int, int],
                exits: Sequence[nn.Module] | None = None) -> list[int]:
    """Cumulative multiply-adds at each exit for one ``image_size`` RGB image.

    ``exits`` are the modules whose completion marks an exit, in the order they run; the default is
    ``model.classifier``. The model's train/eval mode is restored afterwards and nothing it holds
    (weights, BN statistics) changes.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    exits = list(model.classifier if exits is None else exits)
    total = 0
    per_exit: list[int] = []

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor, rule: FlopRule) -> None:
        nonlocal total
        total += int(rule(module, inputs[0], output))

    def mark_exit(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        per_exit.append(total)

    handles = []
    for module in model.modules():
        if next(module.children(), None) is None:
            rule = _rule_for(module)
            if rule is not None:
                handles.append(module.register_forward_hook(
                    lambda m, i, o, rule=rule: count(m, i, o, rule)))
    handles += [m.register_forward_hook(mark_exit) for m in exits]

    was_training = model.training
    parameter = next(model.parameters())
    # Fast layers (ranet_fast.convert) skip their submodules in eval mode; counting runs them
    # through the official forward so that every leaf module's hook sees its work.
    from ranet_fast.nn.common import official_forward

    try:
        model.eval()
        with torch.no_grad(), official_forward():
            model(torch.zeros(1, 3, height, width, dtype=parameter.dtype, device=parameter.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if len(per_exit) != len(exits):
        raise RuntimeError(f"expected {len(exits)} exits to run, saw {len(per_exit)}")
    return per_exit
