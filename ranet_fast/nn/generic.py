"""Fast conv -> BN [-> act] and BN -> ReLU -> conv chains in modules ranet_fast did not write.

:func:`ranet_fast.convert` finds the chains in three places (what counts as a BN and as an
activation: :mod:`ranet_fast.nn.patterns`):

* an ``nn.Sequential`` (or a subclass that keeps ``nn.Sequential.forward``): consecutive children
  conv, BN [, activation] (and BN, ReLU, conv) form a *segment*; the other children run as they are;
* a module whose ``forward``, traced with ``torch.fx`` (its children as single calls), is exactly one
  chain of its children, optionally returned concatenated with the input (``cat([x, chain(x)], 1)``,
  the DenseNet-style layer): :class:`FastChainMixin`;
* a module whose traced ``forward`` contains chains among other operations (a residual add, a
  squeeze-excite): :class:`FastGraphMixin` runs, in eval mode, the traced graph with each chain
  replaced by one call. A failed trace leaves the module alone.

A chain step's output must go only to the next step. In eval mode a conv -> BN [-> act] (no BN
before the conv) runs as the conv with the BN folded into its weight and bias, followed by the
activation (any conv: groups, dilation, padding modes); a chain with a BN -> ReLU before the conv
is one ``fused_conv2d`` call (BN and ReLU in its prologue, a BN after the conv in its epilogue), as
is a segment written straight into a buffer's channel slice. An activation the op lacks runs
after the fused call.

The module's class is changed to a subclass (made once per original class) that overrides only
``forward``, so parameters, buffers, state_dict keys, hooks and ``isinstance`` stay as they were.
A segment runs fused only when it is exactly equivalent at that call: its BNs in eval mode with
running statistics, the conv one the chosen path computes (under autocast: an input already in the
autocast dtype, the conv computed in it as eager's is), no hooks on the modules the segment would
skip, the children still the ones that were planned, and outside
:func:`ranet_fast.nn.common.official_forward`. Otherwise it runs its children (a traced module in
train mode: its original ``forward``). Train mode is therefore the original computation, and a
frozen (eval-mode) BN inside a training model is folded differentiably. Where fusing applies, the
module's forward is one candidate of the measured dispatch (:func:`ranet_fast.nn.common.run_faster_path`)
and its original forward the other, so a fused module runs whichever this device runs faster.

The fx proof is a trace in eval mode with the module's attributes at conversion time: a ``forward``
that branches on a Python attribute which is changed after ``convert`` is not re-checked, and the
traced graph is what runs (``out += y`` becomes ``out = out + y``). Tracing calls ``forward`` once
on proxies, so Python side effects in it (a counter, a print) happen once more.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules import module as _module_globals

from ranet_fast.ops import fused_conv2d
from ranet_fast.ops.fused_conv2d import SUPPORTED_STRIDES, accumulation_dtype, activate, activate_, activation_code
from ranet_fast.ops.fused_conv2d import output_size as conv_output_size

from .common import buffer_like, conv_supported, official_forward_active, requires_grad, run_faster_path, tensor_of
from .dense import _bn_foldable, fold_batch_norm, folded_bn
from .patterns import (OP_EPILOGUE_ACTIVATIONS, OP_PROLOGUE_ACTIVATIONS, activation_name, batch_norm_kind,
                       is_functional_relu, negative_slope, trace_own_forward)
from .precision import autocast_active, autocast_off, conv_dtype, conv_weight, outside_autocast_dtype


@dataclass(frozen=True)
class Segment:
    """One fused_conv2d over children of the owning module: [pre_bn -> act ->] conv [-> post_bn [-> act]].

    ``steps`` are the children in call order; ``None`` stands for a functional ReLU of a traced
    forward. ``activation`` is the epilogue's (a name of ``patterns.OP_EPILOGUE_ACTIVATIONS``),
    ``prologue_activation`` the one after ``pre_bn``; ``negative_slope`` the LeakyReLU slope of
    either (one per call).
    ``then_bn_activation``: ``post_bn`` is a BN+activation module whose activation this call cannot
    compute (a LeakyReLU slope other than the prologue's); it runs (``post_bn.act``) on the fused result.
    """

    conv: str
    pre_bn: str | None
    post_bn: str | None
    activation: str
    steps: tuple[str | None, ...]
    then_bn_activation: bool = False
    prologue_activation: str = "relu"
    negative_slope: float = 0.01

    @property
    def pattern(self) -> str:
        parts = [f"bn-{self.prologue_activation}".removesuffix("-none")] * (self.pre_bn is not None)
        parts += ["conv"] + ["bn"] * (self.post_bn is not None)
        parts += [self.activation] * (self.activation != "none")
        return "-".join(parts) + ("+act" if self.then_bn_activation else "")

    @functools.cached_property
    def activation_code(self) -> int:
        return activation_code(self.activation)

    @property
    def folds(self) -> bool:
        """conv -> BN [-> act] without a BN before the conv: in eval mode the BN is folded into the conv's
        weight and bias, and the conv runs as the module would run it (any groups, dilation, padding)."""
        return self.pre_bn is None and self.post_bn is not None

    def describe(self) -> str:
        return f"{self.pattern} ({', '.join('F.relu' if s is None else s for s in self.steps)})"


@dataclass
class Plan:
    """What a fast module runs: segments and plain children (names) in order, and the children it was
    planned for (identity-checked at every call: a replaced child voids the plan).

    A plan of a traced forward that is not one chain (:class:`FastGraphMixin`) holds only its
    segments and ``graph_forward``, the traced forward with each segment's calls replaced by one.
    """

    items: tuple[Segment | str, ...]
    children: tuple[nn.Module, ...]
    concat: bool = False  # traced dense layer: the result is cat([x, chain(x)], 1)
    graph_forward: Callable | None = field(default=None, compare=False, repr=False)

    def current(self, owner: nn.Module) -> bool:
        modules = owner._modules.values()
        return len(modules) == len(self.children) and all(map(operator.is_, modules, self.children))

    @property
    def segments(self) -> list[Segment]:
        return [item for item in self.items if isinstance(item, Segment)]

    def __getstate__(self):
        # The generated forward cannot be pickled; the module traces its forward again on first use.
        return {**self.__dict__, "graph_forward": None}


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


def _describe(module: nn.Module | None) -> tuple[str, object]:
    """(kind, detail) of one chain step: ("conv", None), ("bn", BatchNormKind), ("act", op name) or
    ("other", why a BatchNorm2d is not foldable, or None). Exact torch.nn classes only (a subclass may
    change forward), except BN+activation modules proven by structure (see :mod:`.patterns`)."""
    if module is None:
        return "act", "relu"  # a functional ReLU of a traced forward
    if type(module) is nn.Conv2d:
        return "conv", None
    kind, reason = batch_norm_kind(module)
    if kind is not None:
        return "bn", kind
    name = activation_name(module)
    return ("act", name) if name is not None else ("other", reason)


def plan_chain(names: list[str | None],
               modules: list[nn.Module | None]) -> tuple[list[Segment | str], list[tuple[str, str]]]:
    """Split a chain of children (each one's output the next one's only input) into segments and plain steps.

    Returns the items and (child name, reason) for each conv left out of every segment and for each
    BatchNorm2d subclass that could not be folded. A conv -> BN followed by an activation the op
    lacks is a segment; the activation runs after it.
    """
    described = [_describe(m) for m in modules]
    n = len(described)

    def kind(i):
        return described[i][0] if i < n else "end"

    def module(i):
        return modules[i] if i < n else None

    def act(i):
        return described[i][1] if kind(i) == "act" else None

    def bn(i):
        return described[i][1] if kind(i) == "bn" else None

    items: list[Segment | str] = []
    notes = [(names[i], reason) for i, (k, reason) in enumerate(described) if k == "other" and reason]
    i = 0
    while i < n:
        j = i
        pre, pre_activation, slope = None, "relu", None
        if bn(i) and bn(i).act is None and act(i + 1) in OP_PROLOGUE_ACTIVATIONS and kind(i + 2) == "conv":
            pre, pre_activation, slope, j = i, act(i + 1), negative_slope(module(i + 1)), i + 2
        elif bn(i) and bn(i).activation in OP_PROLOGUE_ACTIVATIONS and kind(i + 1) == "conv":
            pre, pre_activation, slope, j = i, bn(i).activation, negative_slope(bn(i).act), i + 1  # a BN+act module
        segment = None
        if kind(j) == "conv":
            conv = modules[j]
            post, activation, then_activation, end = None, "none", False, j + 1
            if bn(j + 1):
                post, end = j + 1, j + 2
                inner = bn(j + 1).activation
                skip = end
                while act(skip) == "none":  # nn.Identity placeholders (timm's drop_block) between BN and act
                    skip += 1
                # The op's one slope must serve both activations.
                outer_slope = negative_slope(module(skip)) if inner is None else negative_slope(bn(j + 1).act)
                slope_fits = slope is None or outer_slope is None or slope == outer_slope
                if inner is None and act(skip) in OP_EPILOGUE_ACTIVATIONS and slope_fits:
                    activation, end = act(skip), skip + 1
                    slope = slope if outer_slope is None else outer_slope
                elif inner in OP_EPILOGUE_ACTIVATIONS and slope_fits:
                    activation = inner
                    slope = slope if outer_slope is None else outer_slope
                elif inner is not None:
                    then_activation = True
            # Folding a BN after the conv works for any conv; fused_conv2d computes a subset.
            reason = None if pre is None and post is not None else conv_unsupported_reason(conv)
            if reason is None and pre is not None and modules[pre].num_features != conv.in_channels:
                reason = f"BN {names[pre]} has {modules[pre].num_features} features, conv reads {conv.in_channels}"
            if reason is None and post is not None and modules[post].num_features != conv.out_channels:
                reason = f"BN {names[post]} has {modules[post].num_features} features, conv writes {conv.out_channels}"
            if reason is None and pre is None and post is None:
                reason = "no BatchNorm2d right before or after it"
            if reason is None:
                segment = Segment(conv=names[j], pre_bn=None if pre is None else names[pre],
                                  post_bn=None if post is None else names[post], activation=activation,
                                  steps=tuple(names[i:end]), then_bn_activation=then_activation,
                                  prologue_activation=pre_activation, negative_slope=0.01 if slope is None else slope)
            elif pre is None:  # with a BN -> ReLU before it, the conv is judged again on its own below
                notes.append((names[j], reason))
        if segment is not None:
            items.append(segment)
            i = i + len(segment.steps)
        elif pre is not None:  # the BN (and its ReLU) run as they are; the conv gets its own turn
            items += names[i:j]
            i = j
        else:
            items.append(names[i])
            i += 1
    return items, notes


def plan_sequential(module: nn.Sequential) -> tuple[Plan, list[tuple[str, str]]]:
    names = list(module._modules)
    modules = list(module._modules.values())
    items, notes = plan_chain(names, modules)
    return Plan(items=tuple(items), children=tuple(modules)), notes


def _is_cat_of(node: torch.fx.Node, x: torch.fx.Node, y: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(tensors or ()) == [x, y] and dim in (1, -3) and set(node.kwargs) <= {"tensors", "dim"}


def _chain_link(module: nn.Module, node: torch.fx.Node) -> bool:
    """Whether ``node`` can be a step of a chain: a call of a child on one value, or a functional ReLU."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_module":
        return node.target in module._modules and len(node.args) == 1 and not node.kwargs
    return is_functional_relu(node, node.args[0])


def _chains(module: nn.Module, graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    """The maximal runs of chain steps in which each step is the only user of the step before."""
    runs: list[list[torch.fx.Node]] = []
    run_ending_at: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if not _chain_link(module, node):
            continue
        source = node.args[0]
        run = run_ending_at.pop(source, None) if len(source.users) == 1 else None
        if run is None:
            run = []
            runs.append(run)
        run.append(node)
        run_ending_at[node] = run
    return runs


def _step_name(node: torch.fx.Node) -> str | None:
    return node.target if node.op == "call_module" else None


def _trace_in_eval_mode(module: nn.Module) -> torch.fx.Graph:
    """The module's original forward in eval mode (the only mode its fused graph runs in), children as leaves."""
    training, fast_class = module.training, type(module)
    module.training = False
    if isinstance(module, _FastModule):  # traced again after unpickling: the forward it was converted from
        module.__class__ = fast_class._ranet_fast_base
    try:
        return trace_own_forward(module)
    finally:
        module.training = training
        module.__class__ = fast_class


def plan_traced(module: nn.Module) -> tuple[type | None, Plan | None, str, list[tuple[str, str]]]:
    """(mixin, plan, description, notes) for a module whose forward, traced with torch.fx, has fusable
    chains; (None, None, why not, notes) otherwise. ``notes``: (child, reason) for each conv of a
    chain that is not fused.

    A forward that is one chain (optionally concatenated after the input) gets :class:`FastChainMixin`,
    any other :class:`FastGraphMixin`.
    """
    try:
        graph = _trace_in_eval_mode(module)
    except Exception as error:  # any failure to trace means: not provable
        return None, None, f"torch.fx cannot trace its forward ({type(error).__name__}: " \
                           f"{str(error).splitlines()[0][:100] if str(error) else ''})", []
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or placeholders[0].args:
        return None, None, "forward does not take exactly one input", []
    plans = []
    for run in _chains(module, graph):
        names = [_step_name(node) for node in run]
        items, notes = plan_chain(names, [None if name is None else module._modules[name] for name in names])
        plans.append((run, items, notes))
    notes = [note for _, _, run_notes in plans for note in run_notes]
    segments = [item for _, items, _ in plans for item in items if isinstance(item, Segment)]
    ops = " -> ".join(_node_text(n) for n in nodes if n.op not in ("placeholder", "output", "get_attr"))
    if not segments:
        return None, None, f"no conv/BN chain that fuses in its forward (graph: {ops[:160]})", notes
    x = placeholders[0]
    run, items, _ = plans[0]
    if len(plans) == 1 and nodes[1:1 + len(run)] == run and all(isinstance(item, Segment) for item in items):
        rest = nodes[1 + len(run):]
        concat = len(rest) == 2 and _is_cat_of(rest[0], x, run[-1]) and rest[1].op == "output" \
            and rest[1].args == (rest[0],) and len(x.users) == 2
        plain = len(rest) == 1 and rest[0].op == "output" and rest[0].args == (run[-1],) and len(x.users) == 1
        if plain or concat:
            plan = Plan(items=tuple(items), children=tuple(module._modules.values()), concat=concat)
            description = ", ".join(s.describe() for s in plan.segments) + (" inside cat([x, ...], 1)" if concat else "")
            return FastChainMixin, plan, description, notes
    index = itertools.count()
    for run, items, _ in plans:
        _replace_segments(graph, run, items, index)
    plan = Plan(items=tuple(segments), children=tuple(module._modules.values()), graph_forward=_compile(graph))
    return FastGraphMixin, plan, "traced forward with " + ", ".join(s.describe() for s in segments), notes


def _replace_segments(graph: torch.fx.Graph, run: list[torch.fx.Node], items: list[Segment | str],
                      index: Iterator[int]) -> None:
    """Replace the nodes of each segment of ``run`` by one call of the owner's ``_ranet_fast_segment``
    with the segment's position in the plan (``index`` counts the segments of all runs in order)."""
    position = 0
    for item in items:
        if not isinstance(item, Segment):
            position += 1
            continue
        steps = run[position:position + len(item.steps)]
        position += len(item.steps)
        with graph.inserting_before(steps[-1]):
            fused = graph.call_module("_ranet_fast_segment", (next(index), steps[0].args[0]))
        steps[-1].replace_all_uses_with(fused)
        for node in reversed(steps):
            graph.erase_node(node)


def _compile(graph: torch.fx.Graph) -> Callable:
    """The graph as a Python function of (owner, inputs...), as torch.fx's GraphModule generates it."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<ranet_fast traced forward>", "exec"), namespace)  # noqa: S102 - fx's own codegen
    return namespace["forward"]


def _node_text(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


# --------------------------------------------------------------------------------------------------
# Running a plan.
# --------------------------------------------------------------------------------------------------


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
                or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling the module runs hooks (its own or global ones) that a fused call would skip."""
    return _global_hooks() or _own_hooks(module)


def _hooks_within(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule has hooks of its own (global ones are checked apart).
    Asked for every step of every fused call: a leaf costs four attribute reads, no generator."""
    if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        return True
    children = module._modules
    return bool(children) and any(_hooks_within(child) for child in children.values() if child is not None)


def segment_fusable(owner: nn.Module, segment: Segment, x: torch.Tensor) -> bool:
    # Called at every fused call: checks only what can change between calls, walking the
    # segment's modules directly rather than through the modules() generator.
    if _global_hooks():
        return False
    modules = owner._modules
    for name in segment.steps:  # a BN+activation module's drop and act included
        if name is not None and _hooks_within(modules[name]):
            return False
    for name in (segment.pre_bn, segment.post_bn):
        if name is not None and (modules[name].training or not _bn_foldable(modules[name])):
            return False
    conv = modules[segment.conv]
    if segment.folds:  # the module's conv with the folded weight: whatever conv it has, in the dtype eager's runs in
        return x.dim() == 4 and x.dtype.is_floating_point and conv_dtype(x, tensor_of(conv, "weight")) == x.dtype
    return conv_supported(conv, x)


def writes_into(owner: nn.Module, segment: Segment, x: torch.Tensor) -> bool:
    """Whether run_segment may write this segment's result into a buffer's channel slice (out=):
    fused_conv2d computes the conv and the segment ends with the op's result."""
    return not segment.then_bn_activation and conv_supported(owner._modules[segment.conv], x)


_FOLDED_CONVS = "_ranet_fast_folded_conv"
_VERSION = operator.attrgetter("_version")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _fold_conv(conv: nn.Conv2d, bn: nn.Module, conv_bias: torch.Tensor | None,
               x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) with bn(conv(x)) = conv2d(x, weight, bias): the BN's scale and shift in the
    accumulation dtype (:func:`ranet_fast.nn.dense.fold_batch_norm`), the weight scaled in it and
    both rounded once to x's dtype (under autocast x is already in the autocast dtype, where eager's
    conv would round the unfolded weight)."""
    scale, shift = fold_batch_norm(bn, conv_bias, accumulation_dtype(x.dtype))
    weight = tensor_of(conv, "weight")
    weight = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(x.dtype)
    return weight, shift.to(device=x.device, dtype=x.dtype)


def folded_conv(owner: nn.Module, segment: Segment, conv: nn.Conv2d, bn: nn.Module,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fold_conv` of a segment, cached in ``owner`` per segment.

    The fold runs on every fused call of a model in eval mode, so its check is what each such call
    pays: the entry is reused while each tensor it comes from (conv weight and bias, BN weight, bias,
    running statistics, ``num_batches_tracked``) is the same tensor with the same data pointer and
    version counter, with the same BN eps, x's dtype and device and inference mode. Bypassed (the
    fold is then part of the autograd graph) when the result must carry gradients, and under
    torch.compile, which traces the fold into its graph. Writes through ``tensor.data`` bypass the
    version counters and are not seen, as for :func:`ranet_fast.nn.dense.folded_bn`.
    """
    try:  # the modules' own dicts (every nn.Conv2d and BatchNorm2d registers these names, None or not)
        conv_parameters, bn_parameters, bn_buffers = conv._parameters, bn._parameters, bn._buffers
        sources = (conv_parameters["weight"], conv_parameters["bias"], bn_parameters["weight"], bn_parameters["bias"],
                   bn_buffers["running_mean"], bn_buffers["running_var"], bn_buffers["num_batches_tracked"])
    except KeyError:  # a parametrization, or a BN-like module keeping them elsewhere
        sources = (tensor_of(conv, "weight"), tensor_of(conv, "bias"), tensor_of(bn, "weight"), tensor_of(bn, "bias"),
                   tensor_of(bn, "running_mean"), tensor_of(bn, "running_var"),
                   getattr(bn, "num_batches_tracked", None))
    conv_bias = sources[1]
    present = tuple([t for t in sources if t is not None])
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, present))):
        return _fold_conv(conv, bn, conv_bias, x)
    stamp = (tuple(map(_VERSION, present)), tuple(map(torch.Tensor.data_ptr, present)), bn.eps, x.dtype, x.device,
             torch.is_inference_mode_enabled())
    cache = owner.__dict__.setdefault(_FOLDED_CONVS, {})
    entry = cache.get(segment.conv)
    if entry is not None and entry[1] == stamp and all(map(operator.is_, entry[0], sources)):
        return entry[2]
    with torch.no_grad():
        folded = _fold_conv(conv, bn, conv_bias, x)
    cache[segment.conv] = (sources, stamp, folded)
    return folded


def _run_folded(owner: nn.Module, segment: Segment, x: torch.Tensor) -> torch.Tensor:
    """conv -> eval-mode BN [-> act] as the module's own conv with the BN folded into its weight and bias.

    One convolution with a bias and the activation on its result: no separate BN pass over the
    output, and the conv keeps its groups, dilation and padding.
    """
    modules = owner._modules
    conv = modules[segment.conv]
    weight, bias = folded_conv(owner, segment, conv, modules[segment.post_bn], x)
    if autocast_active(x):
        with autocast_off(x):
            y = conv._conv_forward(x, weight, bias)
    else:  # the common case, without entering a context per call
        y = conv._conv_forward(x, weight, bias)
    # The conv's fresh result, read by nothing else: the activation may overwrite it unless autograd
    # must see the value before it.
    y = (activate if y.requires_grad else activate_)(y, segment.activation_code, segment.negative_slope)
    if segment.then_bn_activation:
        y = modules[segment.post_bn].act(y)
    return y


def run_segment(owner: nn.Module, segment: Segment, x: torch.Tensor, out: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
    """The segment as one convolution: folded (see :func:`_run_folded`) or one fused_conv2d (with ``out``
    always, then not differentiable); the caller checked segment_fusable (and writes_into for ``out``)."""
    if segment.folds and out is None:
        return _run_folded(owner, segment, x)
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
        y = fused_conv2d(x, conv_weight(conv, x.dtype), stride=conv.stride[0], padding=conv.padding[0], out=out,
                         out_offset=offset, activation=segment.activation,
                         prologue_activation=segment.prologue_activation, negative_slope=segment.negative_slope,
                         **vectors)
    if out is None and y.requires_grad and y._is_view():
        # The CPU kernel's 1x1 path returns a view of its GEMM result; autograd forbids in-place
        # writes to a custom op's view output, and code after a conv often writes in place
        # (``out += identity``, ReLU(inplace=True)). Eager's output allows it, so ours must too.
        y = y.clone()
    if segment.then_bn_activation:  # the caller passes out= only where ends_in_op
        y = modules[segment.post_bn].act(y)
    return y


def run_steps(owner: nn.Module, segment: Segment, x: torch.Tensor) -> torch.Tensor:
    """The segment's children one by one, as the original forward calls them."""
    modules = owner._modules
    for name in segment.steps:
        x = torch.relu(x) if name is None else modules[name](x)
    return x


def run_item(owner: nn.Module, item: Segment | str, x: torch.Tensor) -> torch.Tensor:
    """One plan item: a segment fused where that is exact at this call (else its children), or a plain child."""
    if not isinstance(item, Segment):
        return owner._modules[item](x)
    return run_segment(owner, item, x) if segment_fusable(owner, item, x) else run_steps(owner, item, x)


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
        # Segments keep the input's dtype and rank, so each segment's check on the input holds for
        # its own input in the chain: checked once (in plan order), where the fused forward may run.
        fusable: list[bool] = []

        def applicable() -> bool:
            fusable[:] = [segment_fusable(self, segment, input) for segment in self._ranet_fast_plan.segments]
            return any(fusable)

        return run_faster_path(self, (input,), functools.partial(self._fused_forward, input, fusable),
                               functools.partial(super().forward, input), applicable)

    def _fused_forward(self, x: torch.Tensor, fusable: list[bool]) -> torch.Tensor:
        modules = self._modules
        flags = iter(fusable)
        for item in self._ranet_fast_plan.items:
            if not isinstance(item, Segment):
                x = modules[item](x)
            else:
                x = run_segment(self, item, x) if next(flags) else run_steps(self, item, x)
        return x

    def forward_into(self, x: torch.Tensor, out: torch.Tensor, offset: int) -> None:
        """Writes ``self(x)`` into ``out[:, offset : offset + C]``, the last segment straight into it; not
        differentiable."""
        items = self._ranet_fast_plan.items
        last = items[-1] if items else None
        if isinstance(last, Segment) and isinstance(x, torch.Tensor) and not _must_run_eagerly(self, x):
            for item in items[:-1]:
                x = run_item(self, item, x)
            if (segment_fusable(self, last, x) and writes_into(self, last, x)
                    and out.dtype == conv_dtype(x, self._modules[last.conv].weight)):
                run_segment(self, last, x, out, offset)
                return
            result = run_steps(self, last, x)
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
        return run_faster_path(self, (x,), functools.partial(self._fused_chain, x, plan, segments),
                               functools.partial(super().forward, x),
                               lambda: all(segment_fusable(self, segment, x) for segment in segments))

    def _fused_chain(self, x: torch.Tensor, plan: Plan, segments: list[Segment]) -> torch.Tensor:
        if plan.concat and writes_into(self, segments[-1], x) and not requires_grad(x, self):
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


class FastGraphMixin(_FastModule):
    """A module whose traced forward contains fusable chains among other operations (a residual add,
    a squeeze-excite, a pooling): in eval mode it runs the traced forward with each chain as one
    call (``_ranet_fast_segment``), else its original forward."""

    def forward(self, *args, **kwargs):
        # The graph was traced in eval mode, so it holds only there (a forward may branch on self.training).
        if (self.training or len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor)
                or _must_run_eagerly(self, args[0])):
            return super().forward(*args, **kwargs)
        plan = self._ranet_fast_plan
        if plan.graph_forward is None:  # unpickled: trace again
            _, plan, _, _ = plan_traced(self)
            self.__dict__["_ranet_fast_plan"] = plan
        return run_faster_path(self, (args[0],), functools.partial(plan.graph_forward, self, args[0]),
                               functools.partial(super().forward, args[0]))

    def _ranet_fast_segment(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return run_item(self, self._ranet_fast_plan.items[index], x)


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
