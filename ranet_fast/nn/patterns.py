"""The building blocks :func:`ranet_fast.convert` recognises, by structure rather than by class name.

* **Activations**: one table from activation module to the name ``fused_conv2d`` would use for it
  (:data:`ACTIVATION_NAMES`), every one of which the op computes after the conv
  (:data:`OP_EPILOGUE_ACTIVATIONS`) and between the folded BN and the conv
  (:data:`OP_PROLOGUE_ACTIVATIONS`). One conv call has one LeakyReLU slope: where the prologue's and
  the epilogue's differ, the epilogue's activation runs as it is, after the fused conv -> BN.
* **BatchNorm**: ``nn.BatchNorm2d`` itself, and a *BN+activation module*: a ``BatchNorm2d``
  subclass whose children are exactly ``drop`` (``nn.Identity``) and ``act`` (an activation of
  the table) and whose forward, traced with ``torch.fx``, is ``act(drop(F.batch_norm(x, running
  statistics, affine parameters, eps)))``, e.g. timm's ``BatchNormAct2d``. Anything else derived
  from ``BatchNorm2d`` may change what the BN computes and is not fused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ranet_fast.ops.fused_conv2d import ACTIVATIONS

# Activation module -> the op's name for it. A class absent here is not an activation to convert
# (a subclass may compute something else: exact classes only).
ACTIVATION_NAMES: dict[type, str] = {
    nn.Identity: "none",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.LeakyReLU: "leaky_relu",
}
# What fused_conv2d computes: the same activations before (prologue) and after (epilogue) the conv.
OP_EPILOGUE_ACTIVATIONS = ACTIVATIONS
OP_PROLOGUE_ACTIVATIONS = ACTIVATIONS

# Functional ReLU in a traced forward: F.relu/torch.relu/relu_ or the tensor methods.
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def activation_name(module: nn.Module) -> str | None:
    """The op's name for this activation module, or None when it is not one of the table."""
    name = ACTIVATION_NAMES.get(type(module))
    if name == "gelu" and module.approximate != "none":
        return None  # the tanh approximation is another function
    return name


def negative_slope(module: nn.Module | None) -> float | None:
    """A LeakyReLU's slope (the one activation with a parameter), else None."""
    return module.negative_slope if type(module) is nn.LeakyReLU else None


class _ChildrenAreLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule it calls is a single node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def trace_own_forward(module: nn.Module) -> torch.fx.Graph:
    """The graph of ``module.forward`` over its submodules (raises what torch.fx raises)."""
    return _ChildrenAreLeaves().trace(module)


@dataclass(frozen=True)
class BatchNormKind:
    """What a BatchNorm2d module computes: plain BN, or BN followed by the activation module ``act``."""

    act: nn.Module | None  # the activation inside a BN+activation module, None for nn.BatchNorm2d

    @property
    def activation(self) -> str | None:
        return None if self.act is None else activation_name(self.act)


# Shape checks such a forward may make before normalising (timm's: _assert(x.ndim == 4, ...)).
_SIDE_FUNCTIONS = (getattr, operator.eq, torch._assert)


def _is_side_check(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SIDE_FUNCTIONS


def _batch_norm_act_reason(bn: nn.BatchNorm2d) -> str | None:
    """Why ``bn`` (a BatchNorm2d subclass) is not a recognised BN+activation module, or None."""
    children = dict(bn.named_children())
    if set(children) != {"drop", "act"}:
        return f"{type(bn).__name__} derives from BatchNorm2d with children {sorted(children)}, not exactly drop and act"
    if type(children["drop"]) is not nn.Identity:
        return f"{type(bn).__name__}.drop is a {type(children['drop']).__name__}, not nn.Identity"
    if activation_name(children["act"]) is None:
        return f"{type(bn).__name__}.act is a {type(children['act']).__name__}, not an activation convert knows"
    training = bn.training
    try:
        bn.training = False  # the eval-mode computation is the one that is folded
        graph = trace_own_forward(bn)
    except Exception as error:  # any failure to trace means: not provable
        return f"torch.fx cannot trace {type(bn).__name__}.forward ({type(error).__name__})"
    finally:
        bn.training = training
    nodes = list(graph.nodes)
    output = nodes[-1]
    act = output.args[0] if output.op == "output" else None
    drop = act.args[0] if isinstance(act, torch.fx.Node) and act.op == "call_module" and act.target == "act" \
        and len(act.args) == 1 and not act.kwargs else None
    norm = drop.args[0] if isinstance(drop, torch.fx.Node) and drop.op == "call_module" and drop.target == "drop" \
        and len(drop.args) == 1 and not drop.kwargs else None
    if not (isinstance(norm, torch.fx.Node) and norm.op == "call_function" and norm.target is F.batch_norm):
        return f"{type(bn).__name__}.forward is not act(drop(batch_norm(x)))"
    arguments = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                         norm.args))
    arguments.update(norm.kwargs)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    attributes = {key: arguments.get(key) for key in ("running_mean", "running_var", "weight", "bias")}
    if not (len(placeholders) == 1 and arguments.get("input") is placeholders[0]
            and all(isinstance(v, torch.fx.Node) and v.op == "get_attr" and v.target == k for k, v in attributes.items())
            and arguments.get("training") is False and arguments.get("eps") == bn.eps):
        return f"{type(bn).__name__}.forward's batch_norm is not the module's own eval-mode normalisation"
    chain = {norm, drop, act, output, placeholders[0], *attributes.values()}
    if any(n not in chain and not (n.op == "get_attr" or _is_side_check(n)) for n in nodes):
        return f"{type(bn).__name__}.forward computes more than act(drop(batch_norm(x)))"
    return None


def batch_norm_kind(module: nn.Module) -> tuple[BatchNormKind | None, str | None]:
    """(kind, None) for a BN convert can fold, (None, why not) for another BatchNorm2d, (None, None) otherwise."""
    if type(module) is nn.BatchNorm2d:
        return BatchNormKind(act=None), None
    if not isinstance(module, nn.BatchNorm2d):
        return None, None
    reason = _batch_norm_act_reason(module)
    return (None, reason) if reason else (BatchNormKind(act=module.act), None)


def is_functional_relu(node: torch.fx.Node, previous: torch.fx.Node) -> bool:
    """A functional ReLU of ``previous`` only (F.relu/torch.relu/relu_, or the tensor methods)."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = node.args[1:]
        return (node.args[:1] == (previous,) and len(extra) <= 1 and all(isinstance(a, bool) for a in extra)
                and set(node.kwargs) <= {"inplace"})
    return node.op == "call_method" and node.target in _RELU_METHODS and node.args == (previous,) and not node.kwargs
