"""The op registry (ranet_fast/ops/_registry.py): one description per op, one dispatch, one registration.

Each op's own tests check its results on every backend; these check what the registry promises
across ops: every Triton twin takes exactly its compiled op's arguments, and ``run`` asks
``choose_backend`` at every call (the place a measured dispatch plugs in).
"""

import importlib

import pytest
import torch

import ranet_fast.ops
from ranet_fast import _extension
from ranet_fast.ops import _registry

OP_MODULES = ("batch_norm_relu", "exit_confidence", "exit_partition", "fused_conv2d", "gather_rows", "scatter_exits",
              "upsample_concat")


def _specs() -> list[_registry.OpSpec]:
    specs = []
    for name in OP_MODULES:
        module = importlib.import_module(f"ranet_fast.ops.{name}")
        specs.extend(value for value in vars(module).values() if isinstance(value, _registry.OpSpec))
    return specs


def _signature(schema) -> tuple:
    """A schema's argument names, types and writes, and its return types; not its op name or defaults."""
    arguments = [(argument.name, str(argument.type), argument.alias_info is not None and argument.alias_info.is_write)
                 for argument in schema.arguments]
    return arguments, [str(result.type) for result in schema.returns]


def test_every_public_op_has_a_spec():
    names = {spec.name for spec in _specs()}
    public_ops = {name for name in ranet_fast.ops.__all__ if not name.endswith("_reference")}
    assert names == public_ops


@pytest.mark.skipif(not _extension.extension_loaded(), reason="ranet_fast._C is not built")
@pytest.mark.parametrize("spec", _specs(), ids=lambda spec: spec.name)
def test_triton_twin_takes_the_compiled_ops_arguments(spec):
    for suffix in spec.forms:
        compiled = getattr(torch.ops.ranet_fast, _registry.compiled_name(spec, suffix)).default._schema
        twin = getattr(torch.ops.ranet_fast, _registry.triton_name(spec, suffix)).default._schema
        assert _signature(twin) == _signature(compiled), (compiled, twin)


def test_run_asks_choose_backend_at_every_call(monkeypatch):
    seen = []

    def measured(spec, requested, args, form):
        seen.append((spec.name, requested, [tuple(arg.shape) for arg in args]))
        return "reference"

    monkeypatch.setattr(_registry, "choose_backend", measured)
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    confidence, prediction = ranet_fast.ops.exit_confidence(logits, backend="cpu")
    assert seen == [("exit_confidence", "cpu", [(2, 3)])]
    expected_confidence, expected_prediction = ranet_fast.ops.exit_confidence_reference(logits)
    assert torch.equal(confidence, expected_confidence) and torch.equal(prediction, expected_prediction)
