"""What the eval-mode and the train-mode fast layers share: when a conv can be fused, the switch to
the official forward, the measured choice between a fused and the original forward, and the buffers
dense blocks and fusion layers write into."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import torch
import torch.nn as nn

from ranet_fast import dispatch
from ranet_fast.ops.fused_conv2d import SUPPORTED_DTYPES, SUPPORTED_STRIDES

from .precision import conv_dtype

_official_forward = False


@contextlib.contextmanager
def official_forward():
    """Within this context every fast layer runs its official module's forward, which calls the
    layer's submodules (Conv2d, BatchNorm2d, ReLU), so hooks on them fire: ``count_flops`` counts a
    converted model through them."""
    global _official_forward
    previous, _official_forward = _official_forward, True
    try:
        yield
    finally:
        _official_forward = previous


def official_forward_active() -> bool:
    return _official_forward


def tensor_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """``getattr(module, name)`` for a parameter or buffer, read from the module's own dicts: the hot
    paths of the fast layers read a few per call, and nn.Module's ``__getattr__`` costs about a
    microsecond each. A name in neither dict (a parametrization's property) goes through getattr."""
    parameters = module._parameters
    if name in parameters:
        return parameters[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


def requires_grad(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def conv_supported(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether fused_conv2d computes exactly this conv for x, in the dtype eager would (under autocast
    too, see ``precision.conv_dtype``); else the layer runs eagerly."""
    kernel = conv.kernel_size[0]
    return (
        conv.kernel_size[1] == kernel
        and conv.stride[0] == conv.stride[1] in SUPPORTED_STRIDES
        and conv.padding[0] == conv.padding[1] in (0, (kernel - 1) // 2)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.dim() == 4
        and conv_dtype(x, tensor_of(conv, "weight")) in SUPPORTED_DTYPES
    )


def buffer_like(x: torch.Tensor, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An uninitialised [N, channels, *size] tensor (size default: x's) in x's memory format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    size = tuple(x.shape[2:]) if size is None else size
    return torch.empty((x.shape[0], channels, *size), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# Fused or original forward: the measured choice (ranet_fast.dispatch, kind "layer").
# --------------------------------------------------------------------------------------------------

_SIGNATURE_ATTRIBUTE = "_ranet_fast_signature"
# Per fast module: dispatch key -> the path it took ("fused", "eager"), or input shapes -> "inapplicable"
# where no fused forward applied to the call; what ``convert``'s report reads.
_PATHS_ATTRIBUTE = "_ranet_fast_paths"
# The fused forward runs only where it beat the original by more than this fraction of the
# original's time: the timing sees neither the fast module's own per-call cost (a few microseconds
# of checks, which a module whose original forward won does not pay: convert gives it its class
# back) nor the noise of one measurement (a few percent on a shared CPU), and a module that fuses
# for a smaller win can make the whole model slower.
FUSED_MUST_WIN_BY = 0.03
# Per fast module: its call (mode, grad mode, autocast, device, inputs) -> (dispatch generation, choice).
_MEMO_ATTRIBUTE = "_ranet_fast_choices"


def taken_paths(module: nn.Module) -> dict[tuple, str]:
    """What ``module`` ran per kind of call since it was created or converted: keys are the dispatch
    keys of :func:`run_faster_path` (values "fused" or "eager", the measured or cached choice) and,
    for calls no fused forward applied to, ``("inapplicable", training, input shapes and dtypes)``.
    Calls under a forced path or inside ``torch.compile`` are not recorded."""
    return module.__dict__.get(_PATHS_ATTRIBUTE, {})


def _remember(module: nn.Module, key: tuple, path: str) -> None:
    paths = module.__dict__.get(_PATHS_ATTRIBUTE)
    if paths is None:
        paths = module.__dict__[_PATHS_ATTRIBUTE] = {}
    paths[key] = path


def run_faster_path(module: nn.Module, inputs: tuple[torch.Tensor, ...], fused: Callable[[], object] | None,
                    eager: Callable[[], object], applicable: Callable[[], bool] | None = None):
    """``fused()`` or ``eager()`` (the same computation), whichever ``ranet_fast.dispatch`` measured
    faster for this module and these inputs; ``fused`` None, or ``applicable()`` False: no fused
    forward applies to this call. ``applicable`` is asked only where the fused forward may run (a
    module whose original forward won skips the check).

    ``RANET_FAST_LAYERS`` / ``dispatch.layer_path()`` force either; the static default is the
    fused forward (also under torch.compile, which traces it). The key: the module's class and
    structure (a hash of its ``repr``, which names every submodule with its shapes, strides,
    paddings and BN settings; computed once per module, so a submodule replaced later keeps the
    old hash: that can cost speed, never correctness, since both paths compute the same), train
    or eval mode, whether grad mode is on, the autocast dtype (None outside autocast), each input's
    shape, strides, dtype and ``requires_grad``, and the device. Each module keeps the answers it got
    for its own calls (until ``dispatch.forget_choices``), so that a call after the first costs one
    dictionary lookup, not the key's hash.

    What is timed: with gradients needed (grad mode on and an input or parameter requiring grad,
    i.e. a training step), forward and backward, by ``torch.autograd.grad`` of the outputs (with
    ones as their gradients) with respect to those inputs and parameters, which returns the
    gradients instead of accumulating them into ``.grad``; otherwise the forward alone. The fused
    forward is timed with the checks each of its calls makes (the key, ``applicable``), and must
    beat the original by ``FUSED_MUST_WIN_BY``: a module whose original forward won pays none of
    this once ``convert(..., example_inputs=...)`` has given it its class back. Timing
    happens only on a module's first call per key, never while hooks could observe it (then the
    default runs, untimed), and leaves no trace: BatchNorm running statistics (and
    ``num_batches_tracked``) of every submodule and the random-number state (dropout) are saved
    before and restored after it, without bumping their version counters, so the call that
    follows updates them exactly once, as an untimed call would.
    """
    forced = dispatch.forced_layer_path()
    if forced == "eager":
        return eager()
    compiling = torch.compiler.is_compiling()
    if forced is None and not compiling:
        call = _call_key(module, inputs)
        memo = module.__dict__.get(_MEMO_ATTRIBUTE)
        if memo is not None and not dispatch.is_recording():
            known = memo.get(call)
            if known is not None and known[0] == dispatch.generation():
                if known[1] == "eager":
                    return eager()
                if fused is not None and (applicable is None or applicable()):
                    return fused()
    if fused is None or (applicable is not None and not applicable()):
        if not compiling:
            _remember(module, ("inapplicable", module.training, tuple([(t.shape, t.dtype) for t in inputs])),
                      "inapplicable")
        return eager()
    if forced is not None or compiling:
        return fused()
    signature = module.__dict__.get(_SIGNATURE_ATTRIBUTE)
    if signature is None:
        signature = hashlib.sha256(repr(module).encode()).hexdigest()[:16]
        module.__dict__[_SIGNATURE_ATTRIBUTE] = signature
    key = (type(module).__name__, signature) + call

    def fused_as_called():  # what every later call of the fused path costs: its checks, then the forward
        _call_key(module, inputs)
        if applicable is not None:
            applicable()
        return fused()

    grad_enabled = call[1]
    candidates = {"fused": _timed(fused_as_called, module, inputs, grad_enabled),
                  "eager": _timed(eager, module, inputs, grad_enabled)}
    choice = dispatch.pick("layer", key, candidates, default="fused",
                           timing_guard=lambda: _leaves_no_trace(module), prefer=("eager", FUSED_MUST_WIN_BY))
    _remember(module, key, choice)
    if dispatch.decided("layer", key):
        module.__dict__.setdefault(_MEMO_ATTRIBUTE, {})[call] = (dispatch.generation(), choice)
    return fused() if choice == "fused" else eager()


def measure_chosen_against_original(module: nn.Module, inputs: tuple) -> dict[str, float] | None:
    """Median seconds of ``module(*inputs)`` as its fast layers now run it (each on its chosen path:
    "fused") and with every one forced to its original forward ("eager"), timed as
    :func:`run_faster_path` times one layer (the forward, and with gradients needed its backward
    too) and leaving no trace; None where nothing may be timed (tuning off, hooks on a submodule).

    Per-layer choices are each measured alone; this is their sum in place, where a layer's output
    feeds the next and its cost is not quite what it was alone. The forced original carries the
    fast layers' per-call checks, a few microseconds each, which the caller's margin absorbs."""
    if not dispatch.tuning_enabled():
        return None
    tensors = tuple(t for t in inputs if isinstance(t, torch.Tensor))
    parameter = next(module.parameters(), None)
    device = tensors[0].device if tensors else parameter.device if parameter is not None else torch.device("cpu")
    grad_enabled = torch.is_grad_enabled()

    def as_chosen():
        return module(*inputs)

    def as_original():
        with dispatch.layer_path("eager"):
            return module(*inputs)

    with _leaves_no_trace(module) as allowed:
        if not allowed:
            return None
        return dispatch.measure({"fused": _timed(as_chosen, module, tensors, grad_enabled),
                                 "eager": _timed(as_original, module, tensors, grad_enabled)}, device)


def _call_key(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """What a module's choice depends on besides the module: mode, grad mode, autocast dtype, device, inputs."""
    device = inputs[0].device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return (module.training, torch.is_grad_enabled(), autocast, device,
            tuple([(t.shape, t.stride(), t.dtype, t.requires_grad) for t in inputs]))


def _output_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _output_tensors(item)]
    return []


def _timed(path: Callable[[], object], module: nn.Module, inputs: tuple[torch.Tensor, ...],
           grad_enabled: bool) -> Callable[[], object]:
    """What timing ``path`` runs: the forward, and with gradients needed its backward too."""
    def forward_and_backward():
        outputs = [t for t in _output_tensors(path()) if t.requires_grad]
        wrt = [t for t in inputs if t.requires_grad] + [p for p in module.parameters() if p.requires_grad]
        if outputs and wrt:
            # retain_graph: where one input was computed from another (a fusion block's inputs are
            # a dense block's successive outputs), the backward runs through the caller's graph
            # between them, which the caller's own backward needs afterwards.
            torch.autograd.grad(outputs, wrt, grad_outputs=[torch.ones_like(t) for t in outputs], allow_unused=True,
                                retain_graph=True)

    return forward_and_backward if grad_enabled else path


@contextlib.contextmanager
def _leaves_no_trace(module: nn.Module):
    """Around the timing of ``module``'s paths: yields False when hooks would see it; restores the BN
    running statistics and the random-number state afterwards (see ``run_faster_path``)."""
    from .generic import has_hooks  # generic imports this module

    if any(has_hooks(m) for m in module.modules()):  # timing would run the hooks again and again
        yield False
        return
    with preserved_state(module):
        yield True


@contextlib.contextmanager
def preserved_state(module: nn.Module):
    """Restores, on exit, the BatchNorm running statistics (and ``num_batches_tracked``) of every
    submodule of ``module`` and the random-number state, without bumping the buffers' versions: what
    runs inside leaves no trace a later call could see."""
    buffers = [buffer for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for buffer in (m.running_mean, m.running_var, m.num_batches_tracked) if buffer is not None]
    saved = [buffer.clone() for buffer in buffers]
    cpu_random = torch.get_rng_state()
    cuda_random = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            # .data: an autograd graph of an earlier call that saved the buffer stays valid.
            buffer.data.copy_(value)
        torch.set_rng_state(cpu_random)
        if cuda_random is not None:
            torch.cuda.set_rng_state_all(cuda_random)
