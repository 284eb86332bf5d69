"""Measured dispatch (ranet_fast/dispatch.py): ops' backends and fast layers' fused-or-eager path.

What it promises: the fastest candidate wins (a deliberately slow one never does); choices are
measured once and kept in memory and in a per-device, per-versions JSON file that round-trips,
and a corrupt or foreign file is ignored with a warning; an explicit backend or layer path is
obeyed without timing; nothing is timed with tuning off, under torch.compile tracing or CUDA graph
capture (a cached choice or the static default then applies); timing never writes the caller's
buffers, and a timed train-mode layer updates BatchNorm statistics, gradients and the random
state exactly as an untimed call.

The suite runs with tuning off (tests/conftest.py); conftest's ``tuned`` fixture turns it on,
with an empty cache directory of the test's own.
"""

import contextlib
import copy
import json
import time

import pytest
import torch
from torch import nn

import ranet_fast
from ranet_fast import _extension, dispatch
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.ranet import ConvBasic, ConvNormal
from ranet_fast.ops import _registry, exit_confidence, fused_conv2d, fused_conv2d_reference
from cuda_testing import requires_cuda_gpu
from model_testing import randomize_bn

CPU = torch.device("cpu")
needs_extension = pytest.mark.skipif(not _extension.extension_loaded(), reason="ranet_fast._C is not built")


class Counting:
    """A candidate thunk that counts its calls and optionally sleeps (a forced-slow candidate)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.calls = seconds, 0

    def __call__(self):
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)


def no_layer_timing(message):
    """A stand-in for dispatch.measure that lets ops' backends be timed but fails on a layer's paths."""
    measure = dispatch.measure

    def measure_ops_only(candidates, device):
        if "fused" in candidates:
            pytest.fail(message)
        return measure(candidates, device)

    return measure_ops_only


def must_not_run():
    raise AssertionError("a candidate ran although nothing may be timed")


def test_forced_slow_candidate_is_never_chosen(tuned):
    for size in range(8):  # eight keys, the slow candidate first, last and the default
        slow, fast = Counting(seconds=1e-3), Counting()
        candidates = {"slow": slow, "fast": fast} if size % 2 else {"fast": fast, "slow": slow}
        assert dispatch.pick("test", (size, CPU), candidates, default="slow") == "fast"
        assert slow.calls > 1 and fast.calls > 1  # both were timed, more than the warm-up


def test_choice_is_measured_once_then_looked_up(tuned):
    slow, fast = Counting(seconds=1e-3), Counting()
    assert dispatch.pick("test", ("once", CPU), {"slow": slow, "fast": fast}, default="slow") == "fast"
    calls = (slow.calls, fast.calls)
    for _ in range(3):
        assert dispatch.pick("test", ("once", CPU), {"slow": must_not_run, "fast": must_not_run},
                             default="slow") == "fast"
    assert (slow.calls, fast.calls) == calls


def test_disk_cache_round_trips_across_processes(tuned):
    key = ("round trip", CPU, torch.Size([2, 3]), (3, 1), torch.float32, 1.5, None, True)
    assert dispatch.pick("test", key, {"slow": Counting(1e-3), "fast": Counting()}, default="slow") == "fast"
    path = dispatch.cache_path(dispatch.device_name(CPU))
    content = json.loads(open(path).read())
    assert content["device"] == dispatch.device_name(CPU) and content["versions"] == dispatch.versions()
    assert content["choices"] == {repr(("test", key)): "fast"}
    assert [p.name for p in tuned.iterdir()] == [path.rpartition("/")[2]]  # no temporary file left
    dispatch.forget_choices()  # as a new process would start
    assert dispatch.pick("test", key, {"slow": must_not_run, "fast": must_not_run}, default="slow") == "fast"
    dispatch.forget_choices()
    with dispatch.tuning(False):  # a stored measurement is used with tuning off too
        assert dispatch.pick("test", key, {"slow": must_not_run, "fast": must_not_run}, default="slow") == "fast"


def _write_cache(content):
    path = dispatch.cache_path(dispatch.device_name(CPU))
    with open(path, "w") as handle:
        handle.write(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("problem", ["not json", "truncated", "other device", "other torch", "other ranet_fast",
                                     "malformed choices"])
def test_corrupt_or_foreign_cache_file_is_ignored_with_a_warning(tuned, problem):
    key = ("foreign", CPU)
    valid = {"format": dispatch.CACHE_FORMAT, "device": dispatch.device_name(CPU), "versions": dispatch.versions(),
             "choices": {repr(("test", key)): "slow"}}
    content = {
        "not json": "\x00garbage{",
        "truncated": json.dumps(valid)[:40],
        "other device": {**valid, "device": "NVIDIA H200 (sm_90)"},
        "other torch": {**valid, "versions": {**valid["versions"], "torch": "1.0.0"}},
        "other ranet_fast": {**valid, "versions": {**valid["versions"], "ranet_fast": "0.0.1"}},
        "malformed choices": {**valid, "choices": ["slow"]},
    }[problem]
    path = _write_cache(content)
    with pytest.warns(dispatch.DispatchCacheWarning, match="ignoring the cache file"):
        choice = dispatch.pick("test", key, {"slow": Counting(1e-3), "fast": Counting()}, default="slow")
    assert choice == "fast"  # measured, not the stored "slow"
    assert json.loads(open(path).read())["choices"] == {repr(("test", key)): "fast"}  # replaced by a valid file


def test_valid_cache_file_is_used_as_stored(tuned):
    key = ("stored", CPU)
    _write_cache({"format": dispatch.CACHE_FORMAT, "device": dispatch.device_name(CPU),
                  "versions": dispatch.versions(), "choices": {repr(("test", key)): "slow"}})
    assert dispatch.pick("test", key, {"slow": must_not_run, "fast": must_not_run}, default="fast") == "slow"


@pytest.mark.parametrize("switch", ["environment", "api"])
def test_tuning_off_uses_the_default_and_remembers_nothing(tuned, monkeypatch, switch):
    if switch == "environment":
        monkeypatch.setenv(dispatch.TUNING_ENV_VAR, "0")
        off = dispatch.tuning(None)  # no override: the environment decides
    else:
        off = dispatch.tuning(False)
    with off:
        for _ in range(2):
            assert dispatch.pick("test", ("off", CPU), {"slow": must_not_run, "fast": must_not_run},
                                 default="slow") == "slow"
    assert list(tuned.iterdir()) == []
    with dispatch.tuning(True):  # turned on, the same key is measured
        assert dispatch.pick("test", ("off", CPU), {"slow": Counting(1e-3), "fast": Counting()},
                             default="slow") == "fast"


@pytest.mark.parametrize("situation", ["torch.compile tracing", "CUDA graph capture"])
def test_nothing_is_timed_while_tracing_or_capturing(tuned, monkeypatch, situation):
    dispatch.pick("test", ("cached", CPU), {"slow": Counting(1e-3), "fast": Counting()}, default="slow")
    if situation == "torch.compile tracing":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:  # what a capture looks like to the dispatch (tests/test_dispatch.py's GPU test captures for real)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert dispatch.pick("test", ("new", CPU), {"slow": must_not_run, "fast": must_not_run}, default="slow") == "slow"
    assert dispatch.pick("test", ("cached", CPU), {"slow": must_not_run, "fast": must_not_run},
                         default="slow") == "fast"


def test_bad_default_or_key_is_refused(tuned):
    with pytest.raises(ValueError, match="not one of the candidates"):
        dispatch.pick("test", ("k", CPU), {"a": Counting()}, default="b")
    with pytest.raises(ValueError, match="must contain the device"):
        dispatch.pick("test", ("no device",), {"a": Counting(), "b": Counting()}, default="a")


# --------------------------------------------------------------------------------------------------
# Ops: the backend.
# --------------------------------------------------------------------------------------------------


def _conv_case(channels_last=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 9, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(5, 6, 3, 3, generator=generator)


@pytest.fixture
def backends_called(monkeypatch):
    """The backends ``_registry.run`` and the timing ran, in order, with each call's first argument."""
    calls = []
    original = _registry.implementation

    def recording(spec, backend, suffix=_registry.FUNCTIONAL):
        function = original(spec, backend, suffix)

        def call(*args):
            calls.append((spec.name + suffix, backend, args[0]))
            return function(*args)

        return call

    monkeypatch.setattr(_registry, "implementation", recording)
    return calls


@needs_extension
def test_op_backends_are_timed_on_scratch_outputs_and_the_choice_is_kept(tuned, backends_called):
    x, weight = _conv_case()
    out = torch.full((2, 9, 9, 9), float("nan"))
    fused_conv2d(x, weight, padding=1, out=out, out_offset=4)
    timed, real = backends_called[:-1], backends_called[-1]
    assert {backend for _, backend, _ in timed} == {"cpu", "reference"}
    assert all(first.data_ptr() != out.data_ptr() for _, _, first in timed)  # the caller's out never written
    assert real[2] is out
    torch.testing.assert_close(out[:, 4:], fused_conv2d_reference(x, weight, padding=1))
    assert out[:, :4].isnan().all()
    (entry, choice), = [(k, v) for k, v in dispatch._choices.items() if k[1][0] == "fused_conv2d_out"]
    assert real[1] == choice and entry[1][1] == CPU
    backends_called.clear()
    fused_conv2d(x, weight, padding=1, out=out, out_offset=4)
    assert [backend for _, backend, _ in backends_called] == [choice]  # kept: no timing again


@needs_extension
def test_op_key_tells_memory_formats_and_scalars_apart(tuned):
    for channels_last in (False, True):
        x, weight = _conv_case(channels_last)
        for padding in (0, 1):
            fused_conv2d(x, weight, padding=padding)
    keys = [key for kind, key in dispatch._choices if kind == "op"]
    assert len(keys) == 4 and all(key[0] == "fused_conv2d" for key in keys)


@needs_extension
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("how", ["environment", "argument"])
def test_forcing_each_backend_is_obeyed_without_timing(tuned, monkeypatch, backends_called, backend, how):
    monkeypatch.setattr(dispatch, "measure", lambda *args: pytest.fail("timed despite a forced backend"))
    logits = torch.randn(4, 10)
    if how == "environment":
        monkeypatch.setenv(_extension.BACKEND_ENV_VAR, backend)
        exit_confidence(logits)
    else:
        exit_confidence(logits, backend=backend)
    assert [called for _, called, _ in backends_called] == [backend]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forcing_a_backend_that_cannot_run_here_says_why(tuned, monkeypatch, backend):
    if _extension.backend_status(backend, CPU, "exit_confidence")[0]:
        pytest.skip(f"the {backend} backend runs on CPU tensors here (Triton interpreter)")
    with pytest.raises(_extension.BackendUnavailableError, match=f"backend '{backend}' is unavailable"):
        exit_confidence(torch.randn(4, 10), backend=backend)


def test_torch_compile_traces_the_static_backend_without_timing(tuned, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", lambda *args: pytest.fail("timed while torch.compile traced"))
    logits = torch.randn(4, 10)
    compiled = torch.compile(lambda t: exit_confidence(t), backend="eager", fullgraph=True)
    confidence, prediction = compiled(logits)
    expected = ranet_fast.ops.exit_confidence_reference(logits)
    assert torch.equal(prediction, expected[1]) and torch.allclose(confidence, expected[0])
    assert dispatch._choices == {}


@requires_cuda_gpu
def test_nothing_is_timed_under_cuda_graph_capture(tuned, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", lambda *args: pytest.fail("timed during a CUDA graph capture"))
    x, weight = (t.cuda() for t in _conv_case())
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):  # the usual warm-up on a side stream, tuning off for it here
        with dispatch.tuning(False):
            fused_conv2d(x, weight, padding=1)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        y = fused_conv2d(x, weight, padding=1)
    graph.replay()
    torch.testing.assert_close(y, fused_conv2d_reference(x, weight, padding=1), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Layers: fused or eager.
# --------------------------------------------------------------------------------------------------


def _converted(module, seed=0):
    torch.manual_seed(seed)
    randomize_bn(module, seed)
    return ranet_fast.convert(module.double())


@pytest.fixture
def ops_called(monkeypatch):
    """Names of the ops run through the registry (the fused paths run fused_conv2d; eager runs none)."""
    names = []
    original = _registry.choose_backend

    def recording(spec, requested, args, form=_registry.FUNCTIONAL):
        names.append(spec.name)
        return original(spec, requested, args, form)

    monkeypatch.setattr(_registry, "choose_backend", recording)
    return names


@pytest.mark.parametrize("path", ["fused", "eager"])
@pytest.mark.parametrize("how", ["environment", "api"])
def test_forcing_the_layer_path_is_obeyed(tuned, monkeypatch, ops_called, path, how):
    monkeypatch.setattr(dispatch, "measure", no_layer_timing("timed despite a forced layer path"))
    layer = _converted(ConvBasic(4, 6)).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    if how == "environment":
        monkeypatch.setenv(dispatch.LAYERS_ENV_VAR, path)
        forced = contextlib.nullcontext()
    else:
        forced = dispatch.layer_path(path)
    with forced, torch.no_grad():
        y = layer(x)
    assert ops_called == (["fused_conv2d"] if path == "fused" else [])
    with dispatch.layer_path("eager"), torch.no_grad():
        torch.testing.assert_close(y, layer(x))


def test_unknown_layer_path_is_refused(tuned, monkeypatch):
    with pytest.raises(ValueError, match="choose one of fused, eager, auto"):
        with dispatch.layer_path("fast"):
            pass
    monkeypatch.setenv(dispatch.LAYERS_ENV_VAR, "fast")
    layer = _converted(ConvBasic(4, 6)).eval()
    with pytest.raises(ValueError, match="RANET_FAST_LAYERS='fast'"):
        layer(torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_layer_choice_is_timed_once_and_recorded(tuned, monkeypatch):
    layer = _converted(ConvBasic(4, 6)).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    timed = []
    measure = dispatch.measure
    monkeypatch.setattr(dispatch, "measure", lambda candidates, device: timed.append(sorted(candidates))
                        or measure(candidates, device))
    with torch.no_grad(), dispatch.recording() as record:
        first, second = layer(x), layer(x)
    assert ["eager", "fused"] in timed and timed.count(["eager", "fused"]) == 1
    layers = [(key[0], choice) for kind, key, choice in record if kind == "layer"]
    assert len(layers) == 2 and layers[0] == layers[1] and layers[0][0] == "FastConvBasic"
    torch.testing.assert_close(first, second)


def test_timing_a_train_step_leaves_no_trace(tuned):
    """A timed train-mode dense layer: running statistics, num_batches_tracked, gradients and the random
    state as after one untimed step of the eager layer."""
    torch.manual_seed(0)
    eager = ConvNormal(6, 4, bottleneck=True, bnWidth=2).double()
    randomize_bn(eager, 0)
    eager.train()
    fast = ranet_fast.convert(copy.deepcopy(eager)).train()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    grad = torch.randn(3, 10, 5, 5, dtype=torch.float64)
    results = []
    for module in (eager, fast):
        x_in = x.clone().requires_grad_()
        torch.manual_seed(7)
        module(x_in).backward(grad)
        results.append((x_in.grad, [p.grad for p in module.parameters()], list(module.buffers()),
                        torch.get_rng_state()))
    assert ("layer", "FastConvNormal") in {(kind, key[0]) for kind, key in dispatch._choices}
    (x_grad, grads, buffers, random_state), (x_grad_fast, grads_fast, buffers_fast, random_state_fast) = results
    torch.testing.assert_close(x_grad_fast, x_grad)
    torch.testing.assert_close(grads_fast, grads)
    torch.testing.assert_close(buffers_fast, buffers)  # num_batches_tracked == 1 included
    assert all(int(b) == 1 for b in buffers_fast if b.dtype == torch.long)
    assert torch.equal(random_state_fast, random_state)


def test_layers_with_hooks_are_not_timed(tuned, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", no_layer_timing("timed a layer whose hooks would see it"))
    layer = _converted(ConvBasic(4, 6)).eval()
    seen = []
    layer.net[0].register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        layer(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert not any(kind == "layer" for kind, _ in dispatch._choices)
    assert len(seen) <= 1  # the fused path skips the conv's hook, the eager one calls it once


def test_torch_compile_traces_the_fused_layer_without_timing(tuned, monkeypatch, ops_called):
    monkeypatch.setattr(dispatch, "measure", lambda *args: pytest.fail("timed while torch.compile traced"))
    layer = _converted(ConvBasic(4, 6)).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = torch.compile(layer, backend="eager", fullgraph=True)(x)
        with dispatch.layer_path("eager"):
            torch.testing.assert_close(y, layer(x))
    assert "fused_conv2d" in ops_called and not any(kind == "layer" for kind, _ in dispatch._choices)


def test_dispatch_benchmark_runs_and_writes_json(tmp_path):
    from benchmarks import dispatch as dispatch_benchmark

    path = tmp_path / "dispatch.json"
    result = dispatch_benchmark.main(["--configs", "cifar-c1", "--batch", "2", "--max-layers", "3", "--repeats", "1",
                                      "--min-run-time", "0.001", "--device", "cpu", "--json", str(path)])
    assert [(line["workload"], line["layers"]) for line in result["summary"]] == [("eval-forward", 3),
                                                                                    ("train-step", 3)]
    for row in result["rows"]:
        assert row["path"] in ("fused", "eager") and row["ratio"] == row["seconds"]["eager"] / row["seconds"]["auto"]
    saved = json.loads(path.read_text())
    assert saved["complete"] and saved["device_name"] == dispatch.device_name(CPU) and saved["torch_threads"]


def test_timing_nested_layers_of_a_whole_train_step_leaves_the_step_intact(tuned):
    """A converted RANet's first train step with tuning on, every fast layer measured inside its
    parent's timing: a fusion block's inputs are successive outputs of one dense block, so timing
    its backward runs through the step's own graph between them, which the step's backward needs
    afterwards. Loss, gradients and BN running statistics equal the eager model's (float64)."""
    torch.manual_seed(3)
    eager = RANet(ranet_config("cifar-c1", nChannels=8, growthRate=4, step=2)).double()
    randomize_bn(eager)
    fast = ranet_fast.convert(copy.deepcopy(eager))
    eager.train(), fast.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for model in (eager, fast):
        sum(logits.square().mean() for logits in model(x)).backward()
    assert {"FastBlockUpNormal", "FastConvUpNormal"} <= {key[0] for kind, key in dispatch._choices if kind == "layer"}
    fast_parameters, fast_buffers = dict(fast.named_parameters()), dict(fast.named_buffers())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(fast_parameters[name].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(fast_buffers[name], b, rtol=1e-9, atol=1e-12, msg=name)


def _layer_timing(monkeypatch, fused_over_eager: float, timed: list):
    """dispatch.measure answering, for a layer's paths, fused = ``fused_over_eager`` x eager seconds."""
    measure = dispatch.measure

    def fake(candidates, device):
        if "fused" not in candidates:
            return measure(candidates, device)
        timed.append(1)
        return {"fused": 1e-3 * fused_over_eager, "eager": 1e-3}

    monkeypatch.setattr(dispatch, "measure", fake)


@pytest.mark.parametrize("fused_over_eager, expected", [(0.99, "eager"), (0.9, "fused")])
def test_fused_path_must_win_by_a_margin(tuned, monkeypatch, ops_called, fused_over_eager, expected):
    timed = []
    _layer_timing(monkeypatch, fused_over_eager, timed)
    layer = _converted(ConvBasic(4, 6)).eval()
    with torch.no_grad():
        layer(torch.randn(2, 4, 5, 5, dtype=torch.float64))
        ops_called.clear()
        layer(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert timed == [1] and ("fused_conv2d" in ops_called) == (expected == "fused")
    assert [choice for (kind, _), choice in dispatch._choices.items() if kind == "layer"] == [expected]


def test_a_modules_kept_choice_lasts_until_the_dispatch_forgets(tuned, monkeypatch):
    _layer_timing(monkeypatch, 0.5, [])
    asked = []
    pick = dispatch.pick
    monkeypatch.setattr(dispatch, "pick", lambda kind, *args, **kwargs: asked.append(kind) or pick(kind, *args, **kwargs))
    layer = _converted(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer(x)  # the module's own record of its choice: the dispatch is not asked
        assert asked.count("layer") == 1
        dispatch.forget_choices()
        layer(x)
    assert asked.count("layer") == 2


def test_a_hook_added_after_the_fused_choice_runs_the_original_forward(tuned, monkeypatch):
    _layer_timing(monkeypatch, 0.5, [])
    eager = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).double().eval()
    randomize_bn(eager, 0)
    layer = ranet_fast.convert(copy.deepcopy(eager))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        layer(x)
        layer[1].register_forward_hook(lambda *args: seen.append(1))
        torch.testing.assert_close(layer(x), eager(x), rtol=1e-12, atol=1e-12)
    assert seen == [1]
