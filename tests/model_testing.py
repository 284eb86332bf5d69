"""What the model tests share: models with non-trivial BatchNorm, input images, and the official
early-exit simulation the engine is compared with (tests/test_early_exit.py, tests/test_msdnet.py).

The simulation is what the official adaptive_inference.py computes: full forward passes of every
sample through every exit, then the first exit whose confidence reaches its threshold.
"""

import math

import torch

from ranet_fast.inference import assign_exits, early_exit, exit_probabilities, find_thresholds


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that folding them (eval) and using them
    (train) is a real test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for tensor, low, high in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                                          (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * (high - low)
                                 + low)


def randomize_eval_bn(model: torch.nn.Module, seed: int, dtype) -> None:
    """Random BN affine parameters and statistics of ``dtype``, so that no layer is the identity it
    starts as (the early-exit models' draw)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = 0.5 + torch.rand(module.weight.shape, generator=generator, dtype=dtype)
            module.bias.data = 0.2 * torch.randn(module.bias.shape, generator=generator, dtype=dtype)
            module.running_mean = 0.1 * torch.randn(module.running_mean.shape, generator=generator, dtype=dtype)
            module.running_var = 0.5 + torch.rand(module.running_var.shape, generator=generator, dtype=dtype)


def images(n, seed, dtype=torch.float64, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def confidences(logits, criterion="max_softmax"):
    """[K, N] confidence from [K, N, C] logits, in float64 (the simulation's definition)."""
    p = torch.softmax(logits.double(), dim=2)
    if criterion == "max_softmax":
        return p.amax(dim=2)
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    return 1 + plogp.sum(dim=2) / math.log(logits.shape[2])


def simulate(model, x, thresholds, criterion="max_softmax"):
    """The official simulation: full forward, first exit with confidence >= threshold."""
    with torch.no_grad():
        logits = torch.stack(model(x))
    conf = confidences(logits, criterion)
    exit_index = assign_exits(conf, torch.as_tensor(thresholds, dtype=torch.float64))
    chosen = logits[exit_index, torch.arange(x.shape[0])]
    return logits, conf, exit_index, chosen


def calibrated(model, p, criterion="max_softmax", seed=100, n=64):
    """Thresholds fitted on a separate batch, so that no test confidence is a threshold itself."""
    with torch.no_grad():
        val_logits = torch.stack(model(images(n, seed, dtype=next(model.parameters()).dtype)))
    return find_thresholds(confidences(val_logits, criterion), exit_probabilities(p, val_logits.shape[0]))


def assert_matches_simulation(model, x, thresholds, criterion="max_softmax", rtol=1e-10, atol=1e-12):
    logits, conf, expected_exit, expected_logits = simulate(model, x, thresholds, criterion)
    result = early_exit(model, x, thresholds, criterion=criterion)
    # A confidence within rounding of its threshold may fall either way: the batch the engine
    # runs a sample in differs from the full batch, and so may the last bits of its logits.
    near = (conf - torch.as_tensor(thresholds, dtype=torch.float64)[:, None]).abs() < 1e-9
    decided = ~near[:-1].any(dim=0)
    assert decided.float().mean() > 0.9
    assert torch.equal(result.exit_index[decided], expected_exit[decided])
    agree = result.exit_index == expected_exit
    torch.testing.assert_close(result.logits[agree], expected_logits[agree], rtol=rtol, atol=atol)
    counts = torch.bincount(result.exit_index, minlength=model.num_exits).tolist()
    assert result.exit_counts == counts
    assert sum(result.exit_counts) == x.shape[0]
    return result
