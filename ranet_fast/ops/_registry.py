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

Choosing the backend. ``choose_backend(spec, requested, args, form)`` is the one place that
decides. An explicit request (the ``backend`` argument, else ``RANET_FAST_BACKEND``) is honoured as
``ranet_fast._extension.resolve_backend`` resolves it (one that cannot run raises
``BackendUnavailableError``). Without one, the backends that can run on the arguments' device
(CPU tensors: ``cpu`` and ``reference``; CUDA tensors: ``cuda``, ``triton`` and ``reference``; Triton
on CPU is its interpreter, a test tool, never a speed candidate) are timed on the real arguments by
``ranet_fast.dispatch.pick`` once per key, and the fastest is kept; the static default (the first
of that list that can run) applies where nothing may be timed. The key is the op and form, every
tensor's shape, strides and dtype, the device, and the scalar arguments. ``run`` looks the function
up at each call, so replacing the module attribute replaces the dispatch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

from .. import _extension, dispatch

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


def choose_backend(spec: OpSpec, requested: str | None, args: tuple, form: str = FUNCTIONAL) -> str:
    """The backend that runs form ``form`` of ``spec`` on ``args`` (see the module docstring)."""
    tensor = _first_tensor(args)
    if _extension.requested_backend(requested) is not None or torch.compiler.is_compiling():
        # torch.compile: the static choice, which it evaluates once as a constant (nothing is timed
        # while tracing, and tracing the key and the cache lookup would only add guards).
        return _extension.resolve_backend(spec.name, tensor, requested, spec.triton_module)
    device = tensor.device
    backends = _runnable_backends(device, spec.triton_module)
    if len(backends) == 1:
        return backends[0]
    key = (spec.name + form, device, tuple([_describe(argument) for argument in args]))
    return dispatch.pick("op", key, _BackendCandidates(spec, form, backends, args), default=backends[0])


_RUNNABLE: dict[tuple[torch.device, str], tuple[str, ...]] = {}


def _runnable_backends(device: torch.device, triton_module: str) -> tuple[str, ...]:
    """The backends that can run on ``device``, static default first (availability is fixed per process)."""
    key = (device, triton_module)
    if key not in _RUNNABLE:
        _RUNNABLE[key] = tuple(backend for backend in _extension.automatic_order(device)
                               if _extension.backend_status(backend, device, triton_module)[0])
    return _RUNNABLE[key]


def _describe(argument):
    """An argument as the dispatch key sees it: what the time of a call depends on.

    Tensors by shape, strides (hence memory format) and dtype; ints, bools, strings and None by
    value (strides, paddings, flags, offsets); a float by its type only: float arguments are values
    such as an exit threshold, which change no amount of work, and keying on them would time the
    op again for every threshold.
    """
    if isinstance(argument, torch.Tensor):
        return argument.shape, argument.stride(), argument.dtype
    if isinstance(argument, (list, tuple)):
        return tuple([_describe(item) for item in argument])
    if isinstance(argument, float):
        return float
    return argument


class _BackendCandidates(Mapping):
    """backend -> a thunk running the op on it once, for ``dispatch.pick``; thunks made only when timed.

    What timing may do to the caller's data: nothing. The thunks run under ``torch.no_grad`` (a
    forward-only measurement: no graph is recorded, and the kernels are the same) and give every
    argument the form writes (``Form.mutates_args``: out= buffers, scatter_exits' results) a scratch
    tensor of the same shape and strides instead, so the caller's buffers are never written; the
    ops have no other side effects (no running statistics, no random numbers). The scratch
    tensors are uninitialised: the forms only write them.
    """

    def __init__(self, spec: OpSpec, form: str, backends: tuple[str, ...], args: tuple):
        self._spec, self._form, self._backends, self._args = spec, form, backends, args
        self._scratch_args: tuple | None = None

    def __contains__(self, backend) -> bool:
        return backend in self._backends

    def __iter__(self):
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)

    def __getitem__(self, backend: str) -> Callable[[], object]:
        if backend not in self._backends:
            raise KeyError(backend)
        function = implementation(self._spec, backend, self._form)

        def call():
            with torch.no_grad():
                return function(*self._scratch())

        return call

    def _scratch(self) -> tuple:
        if self._scratch_args is None:
            written = _written_positions(self._spec, self._form)
            self._scratch_args = tuple(
                torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device) if i in written else a
                for i, a in enumerate(self._args))
        return self._scratch_args


_WRITTEN: dict[tuple[str, str], frozenset[int]] = {}


def _written_positions(spec: OpSpec, form: str) -> frozenset[int]:
    """Positions of the arguments form ``form`` writes (its schema is the Triton body's signature)."""
    key = (spec.name, form)
    if key not in _WRITTEN:
        names = list(inspect.signature(spec.forms[form].triton).parameters)
        _WRITTEN[key] = frozenset(names.index(name) for name in spec.forms[form].mutates_args)
    return _WRITTEN[key]


def implementation(spec: OpSpec, backend: str, suffix: str = FUNCTIONAL) -> Callable:
    """The callable of form ``suffix`` of ``spec`` on ``backend``."""
    if backend in COMPILED_BACKENDS:
        return getattr(getattr(torch.ops, NAMESPACE), compiled_name(spec, suffix))
    if backend == "triton":
        return getattr(getattr(torch.ops, NAMESPACE), triton_name(spec, suffix))
    return spec.forms[suffix].reference


def run(spec: OpSpec, backend: str | None, *args, form: str = FUNCTIONAL):
    """Runs form ``form`` of ``spec`` on ``args`` with the chosen backend; ``backend`` is the request."""
    return implementation(spec, choose_backend(spec, backend, args, form), form)(*args)
