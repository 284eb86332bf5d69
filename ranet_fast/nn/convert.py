"""``ranet_fast.convert``: swap fast layers into any model, in place.

Three kinds of replacement, none of which changes parameters, buffers, state_dict keys or hooks:

1. Known classes (RANet's and MSDNet's blocks, torchvision's DenseNet layer and block): the
   module's class becomes a fast subclass that overrides only ``forward``.
2. Conv -> BN -> ReLU and BN -> ReLU -> conv chains in any ``nn.Sequential`` and in any module whose
   forward is provably (``torch.fx``) one such chain, possibly concatenated after its input
   (:mod:`ranet_fast.nn.generic`): the module's class becomes a fast subclass of its own class.
3. Nothing else: what cannot be proven equivalent is left alone, and the report says why.

Every fast module runs fused only where that is the same computation (eval-mode BN folded into the
conv, a conv ``fused_conv2d`` computes, no hooks it would skip, under autocast an input in the
autocast dtype) and falls back to the original forward otherwise, so train mode is the original
computation. Where it may fuse, it asks the measured dispatch (:mod:`ranet_fast.dispatch`, kind
"layer") at its first call per input shape whether the fused or the original forward is faster on
this device, and runs that one: a converted model is never slower than the original beyond the
timing's noise. The report (:meth:`ConvertReport.chains`) says per candidate chain which won.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from ranet_fast import dispatch

from ranet_fast.models import msdnet
from ranet_fast.models.ranet import ConvBasic, ConvBN, ConvNormal, ConvUpNormal, _BlockNormal, _BlockUpNormal

from .common import FUSED_MUST_WIN_BY, measure_chosen_against_original, preserved_state, taken_paths
from .dense import FastBlockNormal, FastConvBasic, FastConvBN, FastConvNormal
from .fusion import FastBlockUpNormal, FastConvUpNormal
from .generic import FastChainMixin, FastGraphMixin, FastSequentialMixin, install, plan_sequential, plan_traced, uninstall
from .msdnet_layers import FastConvDownNormal, FastMSDConvNormal

# Official class -> fast subclass. A fast class only overrides forward, so a module is converted
# by changing its class: parameters, buffers, state_dict keys and hooks stay as they are.
# The dense layers fuse only in eval mode and run the official forward in train mode.
FAST_CLASSES: dict[type, type] = {
    ConvBasic: FastConvBasic,
    ConvBN: FastConvBN,
    ConvNormal: FastConvNormal,
    _BlockNormal: FastBlockNormal,
    ConvUpNormal: FastConvUpNormal,
    _BlockUpNormal: FastBlockUpNormal,
    msdnet.ConvNormal: FastMSDConvNormal,
    msdnet.ConvDownNormal: FastConvDownNormal,
}

# Fast class -> the class convert replaced (torchvision's DenseNet classes are added when in use).
_ORIGINAL_CLASSES: dict[type, type] = {fast: original for original, fast in FAST_CLASSES.items()}

# Children whose computation a fast class does itself (fused), so they are not examined on their own.
_OWNED_CHILDREN: dict[type, tuple[str, ...]] = {FastConvBasic: ("net",), FastConvBN: ("net",)}


@dataclass(frozen=True)
class ChainStatus:
    """One candidate chain of :meth:`ConvertReport.chains`: the module (qualified name, "" the model),
    the pattern it matched (or its class), the outcome and why.

    ``outcome``: "fused" (every call so far ran the fused forward), "original" (none did), "mixed"
    (depends on the call: mode or input shape), "not run" (a fast module not called on its own yet:
    the dispatch decides at its first call per input shape; a layer inside a fused block is never
    called on its own) or "left alone" (convert found no pattern it can run exactly).
    ``category`` for "original" and "left alone": "did not pay" (the dispatch measured the original
    faster), "no fused form" (for that call: train-mode BatchNorm, the input's dtype or rank),
    "unsupported" (the pattern or conv is not one convert runs fused).
    """

    module: str
    pattern: str
    outcome: str
    category: str | None
    reason: str


def _describe_call(key: tuple) -> str:
    if key[0] == "inapplicable":
        _, training, inputs = key
        mode = "train" if training else "eval"
        return f"{mode}, input " + ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}" for shape, dtype in inputs)
    _, _, training, grad_enabled, autocast, _, inputs = key
    mode = (("train" if training else "eval") + (" with grad" if grad_enabled else "")
            + (f" under autocast {str(autocast).removeprefix('torch.')}" if autocast is not None else ""))
    return f"{mode}, input " + ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}" for shape, _, dtype, _ in inputs)


def _timing(key: tuple) -> str:
    seconds = dispatch.measured_seconds("layer", key)
    if seconds is None:
        return "choice from the dispatch's disk cache or its static default"
    return f"fused {seconds['fused'] * 1e6:.0f} us, original {seconds['eager'] * 1e6:.0f} us"


def _is_fast(module: nn.Module) -> bool:
    """Whether ``module`` still has a fast class (convert may have given it its original one back)."""
    return type(module) in _ORIGINAL_CLASSES or "_ranet_fast_plan" in module.__dict__


def chain_status(name: str, pattern: str, module: nn.Module) -> ChainStatus:
    """What the fast ``module`` ran so far (:func:`ranet_fast.nn.common.taken_paths`), and why."""
    paths = taken_paths(module)
    if not paths:
        return ChainStatus(name, pattern, "not run", None,
                           "not called on its own yet; the dispatch picks fused or original at the first call per input")
    why = []
    for key, path in paths.items():
        if path == "inapplicable":
            why.append(f"{_describe_call(key)}: original, no fused form for this call")
        else:
            why.append(f"{_describe_call(key)}: {'fused' if path == 'fused' else 'original, fusion did not pay'}"
                       f" ({_timing(key)})")
    outcomes = set(paths.values())
    if outcomes == {"fused"}:
        return ChainStatus(name, pattern, "fused", None, "; ".join(why))
    if "fused" in outcomes:
        return ChainStatus(name, pattern, "mixed", None, "; ".join(why))
    category = "did not pay" if "eager" in outcomes else "no fused form"
    if not _is_fast(module):
        why.append("the original module was kept")
    return ChainStatus(name, pattern, "original", category, "; ".join(why))


@dataclass
class ConvertReport:
    """What :func:`convert` found: each fast module with its pattern, and what it left alone and why.

    Names are qualified module names ("" is the model itself). ``replaced`` and ``left_alone``
    describe the model, not one call: converting again finds the same fast modules and reports
    them the same way. :meth:`chains` adds what each fast module ran since: fused, or the original
    forward because fusion did not pay on this device or did not apply to the input.
    """

    replaced: list[tuple[str, str]] = field(default_factory=list)  # (module, pattern)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)
    counts: Counter = field(default_factory=Counter)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)  # replaced name -> module
    # convert(..., example_inputs=...)'s whole-model check: median seconds of the example call with
    # the chosen paths ("fused") and with the original forwards ("eager"); None if it did not run.
    model_seconds: dict[str, float] | None = None
    # The modules that chose to fuse but were given their original class back because the whole
    # model was not faster with them.
    reverted_by_model_check: list[str] = field(default_factory=list)

    def chains(self) -> list[ChainStatus]:
        """Per candidate chain, fused or not and why, as of now (the dispatch decides at each fast
        module's first call per input shape; ``convert(..., example_inputs=...)`` makes that call)."""
        statuses = [chain_status(name, pattern, self.modules[name]) for name, pattern in self.replaced]
        if self.reverted_by_model_check:
            fused, original = (self.model_seconds[path] * 1e3 for path in ("fused", "eager"))
            why = (f"the whole model was not faster with its chosen fusions (example call: {fused:.3g} ms, "
                   f"original {original:.3g} ms): the original module was kept")
            statuses = [ChainStatus(s.module, s.pattern, "original", "did not pay", f"{s.reason}; {why}")
                        if s.module in self.reverted_by_model_check else s for s in statuses]
        statuses += [ChainStatus(name, "", "left alone", "unsupported", reason) for name, reason in self.left_alone]
        return statuses

    def __str__(self) -> str:
        lines = [f"ranet_fast.convert: {len(self.replaced)} replaced, {len(self.left_alone)} left alone"]
        if self.model_seconds is not None:
            verdict = "original modules kept" if self.reverted_by_model_check else "fused modules kept"
            lines.append(f"  whole model, example call: {self.model_seconds['fused'] * 1e3:.3g} ms with the chosen "
                         f"fusions, {self.model_seconds['eager'] * 1e3:.3g} ms original ({verdict})")
        for status in self.chains():
            name = status.module or "(model)"
            if status.outcome == "left alone":
                lines.append(f"  left alone  {name}: {status.reason}")
            else:
                lines.append(f"  replaced    {name}: {status.pattern} [{status.outcome}: {status.reason}]")
        return "\n".join(lines)


@dataclass
class _Known:
    classes: dict[type, type]  # original class -> fast subclass
    checks: dict[type, object]  # original class -> module -> reason it cannot be converted, or None
    owned: dict[type, tuple[str, ...]]  # fast class -> children its forward computes itself


def _known_classes() -> _Known:
    """The fast classes, torchvision's included when it is in use (a model with torchvision layers has
    imported it; convert never imports it for a model without them)."""
    known = _Known(dict(FAST_CLASSES), {}, dict(_OWNED_CHILDREN))
    if "torchvision.models.densenet" in sys.modules:
        from . import torchvision_densenet

        known.classes.update(torchvision_densenet.FAST_CLASSES)
        _ORIGINAL_CLASSES.update({fast: original for original, fast in torchvision_densenet.FAST_CLASSES.items()})
        known.checks.update(torchvision_densenet.UNSUPPORTED_REASON)
        known.owned.update(torchvision_densenet.OWNED_CHILDREN)
    return known


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _has_conv_and_bn_children(module: nn.Module) -> bool:
    children = list(module.children())
    return (any(type(child) is nn.Conv2d for child in children)
            and any(isinstance(child, nn.BatchNorm2d) for child in children))


def _record_plan(module: nn.Module, name: str, report: ConvertReport, covered: set[int]) -> None:
    plan = module._ranet_fast_plan
    if isinstance(module, FastChainMixin):
        pattern = ", ".join(s.describe() for s in plan.segments)
        report.replaced.append((name, f"cat([x, {pattern}], 1)" if plan.concat else pattern))
        report.modules[name] = module
        report.counts["concat-chain" if plan.concat else "chain"] += 1
    elif isinstance(module, FastGraphMixin):
        report.replaced.append((name, "traced forward with " + ", ".join(s.describe() for s in plan.segments)))
        report.modules[name] = module
        report.counts["graph"] += 1
    for segment in plan.segments:
        if isinstance(module, FastSequentialMixin):
            report.replaced.append((name, segment.describe()))
            report.modules[name] = module
        report.counts[segment.pattern] += 1
        covered.add(id(module._modules[segment.conv]))


def _visit(module: nn.Module, name: str, known: _Known, report: ConvertReport, covered: set[int]) -> None:
    fast = known.classes.get(type(module))
    if fast is not None:
        check = known.checks.get(type(module))
        reason = None if check is None else check(module)
        if reason is None:
            module.__class__ = fast
        else:
            report.left_alone.append((name, f"{type(module).__name__}: {reason}"))
    if type(module) in known.classes.values():
        report.replaced.append((name, type(module).__name__))
        report.modules[name] = module
        report.counts[type(module).__name__] += 1
    elif isinstance(module, FastSequentialMixin) or _is_plain_sequential(module):
        # Planned afresh each time: the same children give the same plan (converting twice changes
        # nothing), changed children a new one.
        plan, notes = plan_sequential(module)
        if plan.segments:
            install(module, FastSequentialMixin, plan)
            _record_plan(module, name, report, covered)
        elif isinstance(module, FastSequentialMixin):
            uninstall(module)
        report.left_alone += [(_join(name, child), reason) for child, reason in notes]
    elif isinstance(module, (FastChainMixin, FastGraphMixin)):  # converted before: report it as it is
        _record_plan(module, name, report, covered)
    elif fast is None and _has_conv_and_bn_children(module) and not isinstance(module, (nn.ModuleList,
                                                                                      nn.ModuleDict)):
        mixin, plan, description, notes = plan_traced(module)
        if plan is None:
            report.left_alone.append((name, f"{type(module).__name__}: {description}"))
        else:
            install(module, mixin, plan)
            _record_plan(module, name, report, covered)
        report.left_alone += [(_join(name, child), reason) for child, reason in notes]
    owned = known.owned.get(type(module), ())
    for child_name, child in module.named_children():
        if child_name in owned:
            covered.update(id(m) for m in child.modules() if isinstance(m, nn.Conv2d))
        else:
            _visit(child, _join(name, child_name), known, report, covered)


def _restore_original_class(module: nn.Module) -> None:
    """``module`` as it was before convert (its original forward, nothing decided per call)."""
    if isinstance(module, (FastSequentialMixin, FastChainMixin, FastGraphMixin)):
        uninstall(module)
    else:
        module.__class__ = _ORIGINAL_CLASSES[type(module)]


def _check_the_whole_model(model: nn.Module, example_inputs: tuple, report: ConvertReport) -> None:
    """Each fast module chose fused or original alone; in place, a layer's output feeds the next and
    the sum of the choices can still lose. Times the example call as chosen against the original
    forwards and, unless the chosen fusions win by ``FUSED_MUST_WIN_BY``, gives every fast module
    that would fuse its original class back: a converted model is never slower than the original
    on the example's shapes, beyond the timing's noise."""
    fusing = [name for name, module in report.modules.items()
              if _is_fast(module) and "fused" in taken_paths(module).values()]
    if not fusing:
        return
    report.model_seconds = measure_chosen_against_original(model, example_inputs)
    if report.model_seconds is None:
        return
    if report.model_seconds["fused"] < report.model_seconds["eager"] * (1 - FUSED_MUST_WIN_BY):
        return
    for name in fusing:
        _restore_original_class(report.modules[name])
    report.reverted_by_model_check = fusing


def convert(model: nn.Module, verbose: bool = False, report: bool = False, example_inputs: tuple | None = None):
    """Replace, in place, every module ranet_fast can run faster with the same results; return ``model``
    (with ``report``: ``(model, report)``).

    Works in train or eval mode (a fast module decides per call) and converting twice changes
    nothing. ``model.ranet_fast_converted`` keeps the counts by fast class (known classes) or fused
    pattern (e.g. ``conv-bn-relu``, ``bn-silu-conv``); ``model.ranet_fast_report``, a
    :class:`ConvertReport`, lists each replaced module with its pattern and each examined module or
    conv left alone with the reason, and (:meth:`ConvertReport.chains`) per candidate chain whether
    it ran fused or the original forward and why; ``verbose`` prints it.

    ``example_inputs``: one call ``model(*example_inputs)`` after converting, in the model's mode
    and the caller's grad mode, so that the dispatch measures fused against original for those
    shapes now (not at the first real call) and the report says which won. Every fast module whose
    original forward won at every call it measured gets its original class back (no per-call
    decision left to pay for); it stays in the report as "original", "did not pay". Then the whole
    model is timed on the example as chosen against its original forwards, and unless the chosen
    fusions win by ``FUSED_MUST_WIN_BY`` every fast module gets its original class back (the report
    says so, with the two times). The calls leave no trace: BatchNorm running statistics and the
    random-number state are restored after them.
    """
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"convert: example_inputs must be a tuple of the model's positional inputs, "
                        f"got {type(example_inputs).__name__}")
    found, covered = ConvertReport(), set()
    _visit(model, "", _known_classes(), found, covered)
    # Every conv that runs unfused is accounted for: by its own entry, its parent's (a module left
    # alone) or, for one nothing examined, this one.
    explained = {name for name, _ in found.left_alone}
    for name, module in model.named_modules():
        if (isinstance(module, nn.Conv2d) and id(module) not in covered
                and not {name, name.rpartition(".")[0]} & explained):
            found.left_alone.append((name, "no BatchNorm2d (+ ReLU) pattern around it that convert recognises"))
    model.ranet_fast_converted = dict(found.counts)
    model.ranet_fast_report = found
    if example_inputs is not None:
        with preserved_state(model):
            model(*example_inputs)
        for module in found.modules.values():
            if set(taken_paths(module).values()) == {"eager"}:
                _restore_original_class(module)
        _check_the_whole_model(model, example_inputs, found)
    if verbose:
        print(found)
    return (model, found) if report else model
