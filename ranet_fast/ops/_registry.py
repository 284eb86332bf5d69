"""Each op described once: its forms, their implementations on every backend, one dispatch, one registration.

An op (``OpSpec``) has one or more forms (``Form``), each an operator of the ``ranet_fast``
namespace with its own schema: the functional form ``X``, its ``X_out`` variant that writes into
a caller's buffer, and for some ops a backward ``X_backward`` that is an op of its own. Every form
exists on three implementations with the same arguments:

* the compiled op ``torch.ops.ranet_fast.X<suffix>`` (backends ``cpu`` and ``cuda``), defined in
  C++ by ``ranet_fast._C`` when the extension is loaded;
* its Triton twin ``torch.ops.ranet_fast.X_triton<suffix>`` (backend ``triton``), a custom op
  made here from the form's ``triton`` function, so that torch.compile treats each Triton launch
  as one opaque call;
* the form's ``reference`` function (backend ``reference``), plain PyTorch.

``register(spec)`` registers the fake (shape) function and, where the form has a backward, the
autograd formula on the compiled op and on the Triton twin alike. ``run(spec, backend, *args)``
picks the backend with ``choose_backend`` and calls that backend's implementation of the form.
The op files keep what is specific to each op: validation, the public function, the spec and the
backward math.

Choosing the backend. ``choose_backend(spec, requested, args)`` is the one place that decides:
today it asks ``ranet_fast._extension.resolve_backend`` (the ``backend`` argument, else
``RANET_FAST_BACKEND``, else the fixed order by device; an explicit request that cannot run
raises ``BackendUnavailableError``). A measured dispatch (a table of per-shape timings taken on
the device) plugs in by replacing this function: it receives the spec (``spec.name`` keys the
table), the explicit request (to be honoured as today) and the op's arguments (shapes, dtypes,
device), and returns one of ``cpu``, ``cuda``, ``triton``, ``reference`` for which
``_extension.backend_status(backend, device, spec.triton_module)`` holds. ``run`` looks the
function up at each call, so replacing the module attribute is enough.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

from .. import _extension

NAMESPACE = "ranet_fast"
COMPILED_BACKENDS = ("cpu", "cuda")
# Form suffixes: the functional form, the variant that writes into out=, a backward op.
FUNCTIONAL, OUT, BACKWARD = "", "_out", "_backward"


@dataclasses.dataclass(frozen=True)
class Form:
    """One operator of an op, by its implementations; all take the compiled op's arguments.

    Attributes:
        triton: body of the Triton twin op: allocates the outputs and launches the kernels. Its
            type annotations are the twin's schema (they must match the compiled op's).
        reference: the same computation in plain PyTorch.
        fake: output shapes, dtypes and strides for FakeTensor and torch.compile.
        mutates_args: names of the arguments the form writes (the out= buffers).
        backward, setup_context: the autograd formula, as ``torch.library.register_autograd``
            takes them, or None for a form that is not differentiable. During setup_context
            ``ctx.same_backend(suffix)`` gives the op of form ``suffix`` on the backend being
            differentiated, for a backward that calls the op's other forms.
    """

    triton: Callable
    reference: Callable
    fake: Callable
    mutates_args: tuple[str, ...] = ()
    backward: Callable | None = None
    setup_context: Callable | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op: its name (the functional form's, used in messages), its Triton module and its forms.

    ``forms`` maps a suffix (FUNCTIONAL, OUT, BACKWARD) to the form; the compiled op of form
    ``suffix`` is ``ranet_fast::<name><suffix>`` and its Triton twin ``ranet_fast::<name>_triton<suffix>``.
    ``triton_module`` is the module of ``ranet_fast.kernels`` that holds the op's kernels.
    """

    name: str
    triton_module: str
    forms: Mapping[str, Form]


def compiled_name(spec: OpSpec, suffix: str) -> str:
    return f"{spec.name}{suffix}"


def triton_name(spec: OpSpec, suffix: str) -> str:
    return f"{spec.name}_triton{suffix}"


def triton_kernels(module: str) -> ModuleType:
    """``ranet_fast.kernels.<module>``, imported on first use (importing it imports Triton)."""
    return importlib.import_module(f"ranet_fast.kernels.{module}")


def _same_backend(spec: OpSpec, name_of: Callable[[OpSpec, str], str]) -> Callable[[str], Callable]:
    return lambda suffix: getattr(getattr(torch.ops, NAMESPACE), name_of(spec, suffix))


def _register_form(qualname: str, form: Form, same_backend: Callable[[str], Callable]) -> None:
    torch.library.register_fake(qualname)(form.fake)
    if form.backward is None:
        return

    def setup_context(ctx, inputs, output):
        ctx.same_backend = same_backend
        form.setup_context(ctx, inputs, output)

    torch.library.register_autograd(qualname, form.backward, setup_context=setup_context)


def register(spec: OpSpec) -> None:
    """Defines every form's Triton twin and registers fake and autograd on it and on the compiled op.

    Called once per op, when its module is imported. The compiled ops exist only when
    ``ranet_fast._C`` is loaded; the Triton twins always exist (their kernels are imported when
    they first run).
    """
    for suffix, form in spec.forms.items():
        qualname = f"{NAMESPACE}::{triton_name(spec, suffix)}"
        torch.library.custom_op(qualname, form.triton, mutates_args=form.mutates_args)
        _register_form(qualname, form, _same_backend(spec, triton_name))
        if _extension.extension_loaded():
            _register_form(f"{NAMESPACE}::{compiled_name(spec, suffix)}", form, _same_backend(spec, compiled_name))


def _first_tensor(args: tuple) -> torch.Tensor:
    """The first tensor among ``args``, looking into tensor lists too; every op has one.

    The ops' validation puts all their tensors on one device, so any of them tells the device.
    """
    for argument in args:
        if isinstance(argument, torch.Tensor):
            return argument
        if isinstance(argument, (list, tuple)) and argument and isinstance(argument[0], torch.Tensor):
            return argument[0]
    raise TypeError("an op was called without a tensor argument")


def choose_backend(spec: OpSpec, requested: str | None, args: tuple) -> str:
    """The backend that runs ``spec`` on ``args`` (see the module docstring on replacing this)."""
    return _extension.resolve_backend(spec.name, _first_tensor(args), requested, spec.triton_module)


def implementation(spec: OpSpec, backend: str, suffix: str = FUNCTIONAL) -> Callable:
    """The callable of form ``suffix`` of ``spec`` on ``backend``."""
    if backend in COMPILED_BACKENDS:
        return getattr(getattr(torch.ops, NAMESPACE), compiled_name(spec, suffix))
    if backend == "triton":
        return getattr(getattr(torch.ops, NAMESPACE), triton_name(spec, suffix))
    return spec.forms[suffix].reference


def run(spec: OpSpec, backend: str | None, *args, form: str = FUNCTIONAL):
    """Runs form ``form`` of ``spec`` on ``args`` with the chosen backend; ``backend`` is the request."""
    return implementation(spec, choose_backend(spec, backend, args), form)(*args)
