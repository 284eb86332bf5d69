"""Fast conv -> BN -> ReLU and BN -> ReLU -> conv chains in modules ranet_fast did not write.

:func:`ranet_fast.convert` finds the chains in two places:

* an ``nn.Sequential`` (or a subclass that keeps ``nn.Sequential.forward``): consecutive children
  Conv2d, BatchNorm2d, ReLU (and BatchNorm2d, ReLU, Conv2d) form a *segment*; the other children
  run as they are;
* a module whose ``forward``, traced with ``torch.fx``, is exactly one chain of its own Conv2d,
  BatchNorm2d and ReLU children (ReLU as a module or as ``F.relu``/``torch.relu``/``.relu()``,
  in place or not), optionally returned concatenated with the input (``cat([x, chain(x)], 1)``,
  the DenseNet-style layer). Anything else in the graph, and a failed trace, leaves it alone.

A segment is one ``fused_conv2d`` call: an eval-mode BN before the conv (with its ReLU) is folded
into the prologue, a BN after it into the epilogue (with the conv's bias), a trailing ReLU is the
epilogue's. A conv followed by BN and anything but a ReLU is not a segment unless the BN is the
last child of the ``Sequential`` (``conv-bn``): its output is then the module's output, exactly.

The module's class is changed to a subclass (made once per original class) that overrides only
``forward``, so parameters, buffers, state_dict keys, hooks and ``isinstance`` stay as they were.
A segment runs fused only when it is exactly equivalent at that call: its BNs in eval mode with
running statistics, the conv one ``fused_conv2d`` computes (see ``common.conv_supported``; under
autocast in the autocast dtype, on an input already in it), no hooks on the modules the segment would skip, the children still the ones that were
planned, and outside :func:`ranet_fast.nn.common.official_forward`. Otherwise it runs its children
(a traced module: its original ``forward``). Train mode is therefore the original computation,
and a frozen (eval-mode) BN inside a training model is folded differentiably.

The fx proof is a trace with the module's attributes at conversion time: a ``forward`` that
branches on a Python attribute which is changed after ``convert`` is not re-checked. Tracing calls
``forward`` once on proxies, so Python side effects in it (a counter, a print) happen once more.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module_globals

from ranet_fast.ops import fused_conv2d
from ranet_fast.ops.fused_conv2d import SUPPORTED_STRIDES
from ranet_fast.ops.fused_conv2d import output_size as conv_output_size

from .common import buffer_like, conv_supported, official_forward_active, requires_grad, run_faster_path
from .dense import _bn_foldable, folded_bn
from .precision import autocast_off, conv_dtype, conv_weight, outside_autocast_dtype

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


@dataclass(frozen=True)
class Segment:
    """One fused_conv2d over children of the owning module: [pre_bn -> ReLU ->] conv [-> post_bn [-> ReLU]].

    ``steps`` are the children in call order; ``None`` stands for a functional ReLU of a traced forward.
    """

    conv: str
    pre_bn: str | None
    post_bn: str | None
    relu: bool
    steps: tuple[str | None, ...]

    @property
    def pattern(self) -> str:
        return "-".join(["bn-relu"] * (self.pre_bn is not None) + ["conv"] + ["bn"] * (self.post_bn is not None)
                        + ["relu"] * self.relu)

    def describe(self) -> str:
        return f"{self.pattern} ({', '.join('F.relu' if s is None else s for s in self.steps)})"


@dataclass
class Plan:
    """What a fast module runs: segments and plain children (names) in order, and the children it was
    planned for (identity-checked at every call: a replaced child voids the plan)."""

    items: tuple[Segment | str, ...]
    children: tuple[nn.Module, ...]
    concat: bool = False  # traced dense layer: the result is cat([x, chain(x)], 1)

    def current(self, owner: nn.Module) -> bool:
        modules = owner._modules.values()
        return len(modules) == len(self.children) and all(a is b for a, b in zip(modules, self.children))

    @property
    def segments(self) -> list[Segment]:
        return [item for item in self.items if isinstance(item, Segment)]


# --------------------------------------------------------------------------------------------------
# Planning: which children form segments, and why the others do not.
# --------------------------------------------------------------------------------------------------


def conv_unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why fused_conv2d cannot compute this conv exactly, or None (the static half of conv_supported)."""
    kernel = conv.kernel_size
    if kernel[0] != kernel[1]:
        return f"kernel {kernel[0]}x{kernel[1]} is not square"
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise): fused_conv2d computes groups=1 only"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}: fused_conv2d computes dilation 1 only"
    if not (conv.stride[0] == conv.stride[1] in SUPPORTED_STRIDES):
        return f"stride {conv.stride}: fused_conv2d computes stride 1 or 2"
    if isinstance(conv.padding, str) or not (conv.padding[0] == conv.padding[1] in (0, (kernel[0] - 1) // 2)):
        return f"padding {conv.padding}: fused_conv2d computes padding 0 or (k - 1) // 2"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: fused_conv2d pads with zeros"
    return None


def _kind(module: nn.Module | None) -> str:
    """Exact classes only: a subclass may change forward in ways a fused segment would not honour."""
    if module is None:
        return "relu"  # a functional ReLU of a traced forward
    return {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.ReLU: "relu"}.get(type(module), "other")


def plan_chain(names: list[str | None], modules: list[nn.Module | None],
               bn_may_end: bool) -> tuple[list[Segment | str], list[tuple[str, str]]]:
    """Split a chain of children into segments and plain steps.

    Returns the items and (child name, reason) for each conv left out of every segment.
    ``bn_may_end``: a conv -> BN at the very end of the chain is a segment (its output is the
    module's output, so no activation of this module follows it).
    """
    kinds = [_kind(m) for m in modules]
    n = len(kinds)

    def kind(i):
        return kinds[i] if i < n else "end"

    items: list[Segment | str] = []
    notes: list[tuple[str, str]] = []
    i = 0
    while i < n:
        j = i
        pre = None
        if kind(j) == "bn" and kind(j + 1) == "relu" and kind(j + 2) == "conv":
            pre, j = j, j + 2
        segment = None
        if kind(j) == "conv":
            conv, reason = modules[j], conv_unsupported_reason(modules[j])
            post, relu, end = None, False, j + 1
            if kind(j + 1) == "bn" and (kind(j + 2) == "relu" or (kind(j + 2) == "end" and bn_may_end)):
                post, relu, end = j + 1, kind(j + 2) == "relu", j + 3 if kind(j + 2) == "relu" else j + 2
            if reason is None and pre is not None and modules[pre].num_features != conv.in_channels:
                reason = f"BN {names[pre]} has {modules[pre].num_features} features, conv reads {conv.in_channels}"
            if reason is None and post is not None and modules[post].num_features != conv.out_channels:
                reason = f"BN {names[post]} has {modules[post].num_features} features, conv writes {conv.out_channels}"
            if reason is None and pre is None and post is None:
                if kind(j + 1) == "bn":
                    follower = "the end" if kind(j + 2) == "end" else type(modules[j + 2]).__name__
                    reason = f"conv -> BN -> {follower}: only a ReLU (or nothing, at the end of a Sequential) fuses"
                else:
                    reason = "no BatchNorm2d (+ ReLU) right before or after it"
            if reason is None:
                segment = Segment(conv=names[j], pre_bn=None if pre is None else names[pre],
                                  post_bn=None if post is None else names[post], relu=relu,
                                  steps=tuple(names[i:end]))
            elif pre is None:  # with a BN -> ReLU before it, the conv is judged again on its own below
                notes.append((names[j], reason))
        if segment is not None:
            items.append(segment)
            i = i + len(segment.steps)
        elif pre is not None:  # BN -> ReLU run as they are; the conv gets its own turn
            items += [names[i], names[i + 1]]
            i += 2
        else:
            items.append(names[i])
            i += 1
    return items, notes


def plan_sequential(module: nn.Sequential) -> tuple[Plan, list[tuple[str, str]]]:
    names = list(module._modules)
    modules = list(module._modules.values())
    items, notes = plan_chain(names, modules, bn_may_end=True)
    return Plan(items=tuple(items), children=tuple(modules)), notes


def _relu_node(node: torch.fx.Node, previous: torch.fx.Node) -> bool:
    """A functional ReLU of ``previous`` only (F.relu/torch.relu/relu_, or the tensor methods)."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = node.args[1:]
        return (node.args[:1] == (previous,) and len(extra) <= 1 and all(isinstance(a, bool) for a in extra)
                and set(node.kwargs) <= {"inplace"})
    return node.op == "call_method" and node.target in _RELU_METHODS and node.args == (previous,) and not node.kwargs


def _is_cat_of(node: torch.fx.Node, x: torch.fx.Node, y: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(tensors or ()) == [x, y] and dim in (1, -3) and set(node.kwargs) <= {"tensors", "dim"}


def plan_traced(module: nn.Module) -> tuple[Plan | None, str]:
    """(plan, description) when ``module.forward`` is provably one fusable chain of its children,
    else (None, why not)."""
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as error:  # any failure to trace means: not provable
        return None, f"torch.fx cannot trace its forward ({type(error).__name__}: {str(error).splitlines()[0][:100]})"
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or placeholders[0].args:
        return None, "forward does not take exactly one input"
    x = placeholders[0]
    chain, previous = [], x
    for node in nodes[1:]:
        if node.op == "call_module" and node.args == (previous,) and not node.kwargs and node.target in module._modules:
            chain.append(node.target)
        elif _relu_node(node, previous):
            chain.append(None)
        else:
            break
        previous = node
    rest = nodes[1 + len(chain):]
    concat = len(rest) == 2 and _is_cat_of(rest[0], x, previous) and rest[1].op == "output" \
        and rest[1].args == (rest[0],)
    plain = len(rest) == 1 and rest[0].op == "output" and rest[0].args == (previous,)
    expected_users = 2 if concat else 1
    if not chain or not (plain or concat) or len(x.users) != expected_users \
            or any(len(node.users) != 1 for node in nodes[1:1 + len(chain)]):
        ops = " -> ".join(_node_text(n) for n in nodes if n.op not in ("placeholder", "output"))
        return None, f"forward is not a plain conv/BN/ReLU chain (graph: {ops[:160]})"
    modules = [None if name is None else module._modules[name] for name in chain]
    # The chain's result is the module's output (or goes into the cat only), so a trailing conv -> BN
    # has no activation of this module after it.
    items, notes = plan_chain(chain, modules, bn_may_end=True)
    if notes or not all(isinstance(item, Segment) for item in items):
        why = "; ".join(f"{name}: {reason}" for name, reason in notes) or "a child outside every conv segment"
        return None, f"chain {' -> '.join(_node_text_name(n) for n in chain)} does not fuse completely ({why})"
    plan = Plan(items=tuple(items), children=tuple(module._modules.values()), concat=concat)
    return plan, ", ".join(s.describe() for s in plan.segments) + (" inside cat([x, ...], 1)" if concat else "")


def _node_text(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def _node_text_name(name: str | None) -> str:
    return "F.relu" if name is None else name


# --------------------------------------------------------------------------------------------------
# Running a plan.
# --------------------------------------------------------------------------------------------------


def has_hooks(module: nn.Module) -> bool:
    """Whether calling the module runs hooks (its own or global ones) that a fused call would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_globals._global_forward_hooks
                or _module_globals._global_forward_pre_hooks or _module_globals._global_backward_hooks
                or _module_globals._global_backward_pre_hooks)


def segment_fusable(owner: nn.Module, segment: Segment, x: torch.Tensor) -> bool:
    modules = owner._modules
    for name in segment.steps:
        if name is not None and has_hooks(modules[name]):
            return False
    for name in (segment.pre_bn, segment.post_bn):
        if name is not None and (modules[name].training or not _bn_foldable(modules[name])):
            return False
    return conv_supported(modules[segment.conv], x)


def run_segment(owner: nn.Module, segment: Segment, x: torch.Tensor, out: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
    """The segment as one fused_conv2d (differentiable without ``out``); the caller checked segment_fusable."""
    modules = owner._modules
    conv = modules[segment.conv]
    vectors = {}
    if segment.pre_bn is not None:
        vectors["prologue_scale"], vectors["prologue_shift"] = folded_bn(owner, segment.pre_bn,
                                                                         modules[segment.pre_bn], None, x)
    if segment.post_bn is not None:
        vectors["epilogue_scale"], vectors["epilogue_shift"] = folded_bn(owner, segment.post_bn,
                                                                         modules[segment.post_bn], conv.bias, x)
    elif conv.bias is not None:
        vectors["epilogue_shift"] = conv.bias
    x = x.to(conv_dtype(x, conv.weight))  # under autocast, the cast eager's conv makes
    with autocast_off(x):
        y = fused_conv2d(x, conv_weight(conv, x.dtype), stride=conv.stride[0], padding=conv.padding[0],
                         activation="relu" if segment.relu else "none", out=out, out_offset=offset, **vectors)
    if out is None and y.requires_grad and y._is_view():
        # The CPU kernel's 1x1 path returns a view of its GEMM result; autograd forbids in-place
        # writes to a custom op's view output, and code after a conv often writes in place
        # (``out += identity``, ReLU(inplace=True)). Eager's output allows it, so ours must too.
        y = y.clone()
    return y


def _must_run_eagerly(owner: nn.Module, x: torch.Tensor) -> bool:
    """Whether no segment of ``owner`` may fuse for this input, whatever its modules. Under autocast
    an input outside the autocast dtype runs eagerly: eager's ``cat`` of it with a conv output
    promotes, and the concat-free buffers are in the input's dtype."""
    return official_forward_active() or outside_autocast_dtype(x) or not owner._ranet_fast_plan.current(owner)


class _FastModule:
    """Base of the fast subclasses made by :func:`fast_subclass`."""

    _ranet_fast_base: type
    _ranet_fast_mixin: type
    _ranet_fast_plan: Plan

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle cannot find it by name: rebuild it from its base.
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_rebuild, (type(self)._ranet_fast_mixin, type(self)._ranet_fast_base), *rest)


class FastSequentialMixin(_FastModule):
    """``nn.Sequential`` whose conv segments run as fused_conv2d where that is exact (see the module docstring)."""

    def forward(self, input):
        if not isinstance(input, torch.Tensor) or _must_run_eagerly(self, input):
            return super().forward(input)
        # Segments keep the input's dtype and rank: one fusable now means one fuses in the chain.
        fusing = any(segment_fusable(self, item, input) for item in self._ranet_fast_plan.segments)
        return run_faster_path(self, (input,), functools.partial(self._fused_forward, input) if fusing else None,
                               functools.partial(super().forward, input))

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._modules
        for item in self._ranet_fast_plan.items:
            if not isinstance(item, Segment):
                x = modules[item](x)
            elif segment_fusable(self, item, x):
                x = run_segment(self, item, x)
            else:
                for name in item.steps:
                    x = modules[name](x)
        return x

    def forward_into(self, x: torch.Tensor, out: torch.Tensor, offset: int) -> None:
        """Writes ``self(x)`` into ``out[:, offset : offset + C]``, the last segment straight into it; not
        differentiable."""
        items = self._ranet_fast_plan.items
        last = items[-1] if items else None
        if isinstance(last, Segment) and isinstance(x, torch.Tensor) and not _must_run_eagerly(self, x):
            modules = self._modules
            for item in items[:-1]:
                if not isinstance(item, Segment):
                    x = modules[item](x)
                elif segment_fusable(self, item, x):
                    x = run_segment(self, item, x)
                else:
                    for name in item.steps:
                        x = modules[name](x)
            if segment_fusable(self, last, x) and out.dtype == conv_dtype(x, self._modules[last.conv].weight):
                run_segment(self, last, x, out, offset)
                return
            for name in last.steps:
                x = modules[name](x)
            result = x
        else:
            result = self(x)
        out.narrow(1, offset, result.shape[1]).copy_(result)


class FastChainMixin(_FastModule):
    """A module whose traced forward is one fusable chain (optionally concatenated after its input)."""

    def forward(self, *args, **kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or _must_run_eagerly(self, args[0]):
            return super().forward(*args, **kwargs)
        x = args[0]
        plan = self._ranet_fast_plan
        segments = plan.segments
        # Fused segments keep the input's dtype and rank, so what holds for x holds for every
        # segment's input: decide once, before anything runs.
        if not all(segment_fusable(self, segment, x) for segment in segments):
            return super().forward(x)
        return run_faster_path(self, (x,), functools.partial(self._fused_chain, x, plan, segments),
                               functools.partial(super().forward, x))

    def _fused_chain(self, x: torch.Tensor, plan: Plan, segments: list[Segment]) -> torch.Tensor:
        if plan.concat and not requires_grad(x, self):
            return self._concat_in_place(x, segments)
        y = x
        for segment in segments:
            y = run_segment(self, segment, y)
        return torch.cat([x, y], 1) if plan.concat else y

    def _concat_in_place(self, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """cat([x, chain(x)], 1) with one output allocation: x copied in, the last conv writing after it."""
        y = x
        for segment in segments[:-1]:
            y = run_segment(self, segment, y)
        conv = self._modules[segments[-1].conv]
        size = tuple(conv_output_size(s, conv.kernel_size[0], conv.stride[0], conv.padding[0]) for s in y.shape[2:])
        if size != tuple(x.shape[2:]):
            return super().forward(x)  # eager's cat raises on the size mismatch; let it say so
        out = buffer_like(x, x.shape[1] + conv.out_channels)
        out[:, : x.shape[1]].copy_(x)
        return run_segment(self, segments[-1], y, out, x.shape[1])


_SUBCLASSES: dict[tuple[type, type], type] = {}


def fast_subclass(mixin: type, base: type) -> type:
    """``class Fast<Base>(mixin, base)``, made once per (mixin, base)."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        name = f"Fast{base.__name__}"
        _SUBCLASSES[key] = type(name, (mixin, base), {"_ranet_fast_base": base, "_ranet_fast_mixin": mixin,
                                                      "__module__": __name__, "__qualname__": name})
    return _SUBCLASSES[key]


def _rebuild(mixin: type, base: type) -> nn.Module:
    return object.__new__(fast_subclass(mixin, base))


def install(module: nn.Module, mixin: type, plan: Plan) -> None:
    """Turn ``module`` into its fast subclass running ``plan``; nothing else about it changes."""
    base = type(module)._ranet_fast_base if isinstance(module, _FastModule) else type(module)
    module.__class__ = fast_subclass(mixin, base)
    module.__dict__["_ranet_fast_plan"] = plan


def uninstall(module: nn.Module) -> None:
    """Give ``module`` its original class back (its plan no longer has anything to fuse)."""
    module.__class__ = type(module)._ranet_fast_base
    del module.__dict__["_ranet_fast_plan"]
