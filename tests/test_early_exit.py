"""Real early exit (ranet_fast.inference.early_exit) against the official simulation.

The simulation is what the official adaptive_inference.py computes: full forward passes of every
sample through every exit, then the first exit whose confidence reaches its threshold. The engine
must pick the same exit and return the same logits for every sample while computing later stages
only for the samples still running.
"""

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ranet_fast
from ranet_fast.inference import (assign_exits, calibrate_thresholds, early_exit, exit_confidence,
                                  exit_probabilities, find_thresholds)
from ranet_fast.models import RANet, ranet_config
from cuda_testing import requires_cuda_gpu
from model_testing import assert_matches_simulation, calibrated, confidences, images, randomize_eval_bn

# The engine's module (ranet_fast.inference.early_exit names the function there).
early_exit_module = importlib.import_module("ranet_fast.inference.early_exit")
SMALL = dict(nChannels=4, growthRate=4, step=2)  # C-1/C-3 layouts, narrow and shallow: fast on CPU


def build(name="cifar-c1", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = RANet(ranet_config(name, **{**SMALL, **overrides})).to(dtype).eval()
    randomize_eval_bn(model, seed + 1, dtype)
    return model


@pytest.mark.parametrize("name", ["cifar-c1", "cifar-c3"])
@pytest.mark.parametrize("p", [0.05, 0.5, 1.0, 1.95])
def test_matches_official_simulation(name, p):
    model = build(name)
    x = images(53, seed=1)
    result = assert_matches_simulation(model, x, calibrated(model, p))
    # Mixed budgets really send samples out early and on to the end.
    if p in (0.5, 1.0):
        assert result.exit_counts[0] > 0 and result.exit_counts[-1] > 0


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_criteria_match_simulation(criterion):
    model = build()
    assert_matches_simulation(model, images(40, seed=2), calibrated(model, 1.0, criterion), criterion)


def test_everyone_leaves_at_the_first_exit_and_later_stages_never_run():
    model = build()
    x = images(9, seed=3)
    result = assert_matches_simulation(model, x, [-math.inf] * model.num_exits)
    assert result.exit_counts == [9] + [0] * (model.num_exits - 1)
    assert result.stage_batch_sizes == [9] + [0] * (model.num_exits - 1)
    stages_run = []
    model.scale_flows[0][1].register_forward_hook(lambda *args: stages_run.append(1))
    early_exit(model, x, [-math.inf] * model.num_exits)
    assert stages_run == []


def test_nobody_leaves_early_means_the_full_network():
    model = build()
    x = images(11, seed=4)
    result = assert_matches_simulation(model, x, [math.inf] * model.num_exits)
    assert result.exit_counts == [0] * (model.num_exits - 1) + [11]
    assert result.stage_batch_sizes == [11] * model.num_exits
    with torch.no_grad():
        torch.testing.assert_close(result.logits, model(x)[-1], rtol=1e-12, atol=1e-12)


def test_later_stages_run_only_on_the_samples_still_running():
    model = build()
    x = images(48, seed=5)
    thresholds = calibrated(model, 1.0)
    seen = []
    for classifier in model.classifier:
        classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    result = early_exit(model, x, thresholds, count_flops_spent=False)
    remaining = [48 - sum(result.exit_counts[:k]) for k in range(model.num_exits)]
    assert result.stage_batch_sizes == remaining
    assert seen == [n for n in remaining if n > 0]
    assert remaining[-1] < 48


def test_flops_spent_are_the_expected_flops():
    model = build()
    x = images(30, seed=6)
    result = early_exit(model, x, calibrated(model, 1.0))
    flops = ranet_fast.count_flops(model, 32)
    expected = sum(count * f for count, f in zip(result.exit_counts, flops))
    assert result.flops == pytest.approx(expected, rel=1e-12)
    assert result.flops_per_image == pytest.approx(expected / 30, rel=1e-12)
    assert flops[0] <= result.flops_per_image <= flops[-1]


@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(batch):
    model = build()
    x = images(batch, seed=7)
    result = early_exit(model, x, calibrated(model, 1.0))
    assert result.logits.shape == (batch, 10)
    assert result.exit_index.shape == (batch,)
    assert sum(result.exit_counts) == batch
    if batch:
        assert_matches_simulation(model, x, calibrated(model, 1.0))


def test_float32_and_channels_last():
    model = build(dtype=torch.float32).to(memory_format=torch.channels_last)
    x = images(24, seed=8, dtype=torch.float32).to(memory_format=torch.channels_last)
    assert_matches_simulation(model, x, calibrated(model, 1.0), rtol=1e-5, atol=1e-5)


def test_converted_model_matches_simulation():
    model = ranet_fast.convert(build("cifar-c3"))
    result = assert_matches_simulation(model, images(33, seed=9), calibrated(model, 0.8))
    # The fast layers skip their submodules, yet the FLOPs spent are the official ones.
    flops = ranet_fast.count_flops(build("cifar-c3"), 32)
    assert result.flops == pytest.approx(sum(n * f for n, f in zip(result.exit_counts, flops)), rel=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_op_backend_gives_the_same_result(backend, monkeypatch):
    if backend == "cpu" and not ranet_fast._extension.extension_loaded():
        pytest.skip(f"ranet_fast._C not loaded: {ranet_fast._extension.extension_import_error()}")
    model = build()
    x = images(27, seed=10)
    thresholds = calibrated(model, 1.0)
    automatic = early_exit(model, x, thresholds)
    monkeypatch.setenv("RANET_FAST_BACKEND", backend)
    chosen = early_exit(model, x, thresholds)
    assert torch.equal(chosen.exit_index, automatic.exit_index)
    assert torch.equal(chosen.logits, automatic.logits)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(0, 20), levels=st.lists(st.sampled_from([-math.inf, 0.0, 0.1, 0.1001, 0.101, 0.102,
                                                                  0.105, 0.11, math.inf]), min_size=6,
                                                  max_size=6), seed=st.integers(0, 2**16))
def test_every_sample_gets_exactly_one_prediction(batch, levels, seed):
    """Random confidence patterns: each sample is written once, at its own position, by the first
    exit whose threshold it reaches (an untrained network's confidences sit near 1/C = 0.1)."""
    model = _property_model()
    x = images(batch, seed=seed)
    result = early_exit(model, x, levels)
    assert (result.exit_index >= 0).all() and (result.exit_index < model.num_exits).all()
    assert sum(result.exit_counts) == batch
    with torch.no_grad():
        full = torch.stack(model(x))
    # Each sample's row is its own logits at its exit: no row lost, duplicated or misplaced.
    torch.testing.assert_close(result.logits, full[result.exit_index, torch.arange(batch)], rtol=1e-10, atol=1e-12)
    conf = confidences(full)
    for n in range(batch):
        k = int(result.exit_index[n])
        assert k == model.num_exits - 1 or conf[k, n] >= levels[k] - 1e-12
        assert all(conf[j, n] < levels[j] + 1e-12 for j in range(k))


_PROPERTY_MODEL = []


def _property_model():
    if not _PROPERTY_MODEL:
        _PROPERTY_MODEL.append(build(seed=11))
    return _PROPERTY_MODEL[0]


def test_bad_input_is_refused_clearly():
    model = build()
    x = images(2, seed=12)
    with pytest.raises(ValueError, match="eval mode"):
        early_exit(model.train(), x, [0.5] * 6)
    model.eval()
    with pytest.raises(ValueError, match="6 exits"):
        early_exit(model, x, [0.5] * 3)
    with pytest.raises(ValueError, match="NaN"):
        early_exit(model, x, [math.nan] * 6)
    with pytest.raises(ValueError, match="criterion"):
        early_exit(model, x, [0.5] * 6, criterion="margin")
    with pytest.raises(TypeError, match="staged multi-exit model"):
        early_exit(torch.nn.Linear(3, 3).eval(), x, [0.5])
    with pytest.raises(ValueError, match="flops has 2 values"):
        early_exit(model, x, [0.5] * 6, flops=[1, 2])
    with pytest.raises(TypeError, match="sequence of numbers"):
        early_exit(model, x, ["low"] * 6)


def test_thresholds_for_the_last_exit_are_optional():
    model = build()
    x = images(10, seed=13)
    levels = calibrated(model, 1.0)
    five = early_exit(model, x, levels[:-1])
    six = early_exit(model, x, levels)
    assert torch.equal(five.exit_index, six.exit_index)


class TestCalibration:
    def val_logits(self, seed=0, k=5, n=400, c=10):
        generator = torch.Generator().manual_seed(seed)
        # Later exits more confident, as in a trained network.
        scale = torch.linspace(0.5, 3.0, k)[:, None, None]
        return torch.randn(k, n, c, generator=generator) * scale

    FLOPS = [10.0, 25.0, 40.0, 70.0, 100.0]

    def test_p_gives_the_official_thresholds(self):
        logits = self.val_logits()
        calibration = calibrate_thresholds(logits, self.FLOPS, p=1.2)
        # The official code's confidences are torch.softmax(...).max: ours (the exit_confidence op)
        # are the same function, summed in another order, so equal to torch's within float32
        # rounding (measured: at most 4.4 ulps of 2**-24 apart on torch 2.14 and 2.11; the two
        # torch versions' softmaxes differ from each other by 2). The official search run on our
        # confidences must give our thresholds exactly.
        official = torch.softmax(logits, dim=2).amax(dim=2)
        conf = torch.stack([exit_confidence(exit_logits)[0] for exit_logits in logits])
        torch.testing.assert_close(conf, official, rtol=8 * 2**-24, atol=0)
        assert torch.equal(calibration.thresholds, find_thresholds(conf, exit_probabilities(1.2, 5)))
        counts = torch.bincount(assign_exits(conf, calibration.thresholds), minlength=5)
        assert calibration.exit_counts == counts.tolist()
        assert calibration.expected_flops == pytest.approx(float((counts.double() * torch.tensor(self.FLOPS,
                                                                dtype=torch.float64)).sum() / 400))

    @pytest.mark.parametrize("budget", [12.0, 30.0, 55.0, 80.0, 99.0])
    def test_budget_is_met_as_closely_as_the_search_allows(self, budget):
        logits = self.val_logits(seed=1)
        calibration = calibrate_thresholds(logits, self.FLOPS, budget_flops=budget)
        assert calibration.expected_flops <= budget
        # No official budget parameter gives a larger cost within the budget.
        for p in [q / 20 for q in range(1, 40)]:
            other = calibrate_thresholds(logits, self.FLOPS, p=p).expected_flops
            assert other > budget or other <= calibration.expected_flops

    def test_budget_below_the_first_exit_is_refused(self):
        with pytest.raises(ValueError, match="below the cheapest"):
            calibrate_thresholds(self.val_logits(), self.FLOPS, budget_flops=5.0)

    def test_exactly_one_target(self):
        with pytest.raises(ValueError, match="exactly one"):
            calibrate_thresholds(self.val_logits(), self.FLOPS)
        with pytest.raises(ValueError, match="exactly one"):
            calibrate_thresholds(self.val_logits(), self.FLOPS, p=1.0, budget_flops=50.0)
        with pytest.raises(ValueError, match="one value per exit"):
            calibrate_thresholds(self.val_logits(), [1.0, 2.0], p=1.0)

    def test_calibrated_thresholds_drive_real_early_exit(self):
        model = build()
        with torch.no_grad():
            val_logits = torch.stack(model(images(80, seed=14)))
        flops = ranet_fast.count_flops(model, 32)
        budget = (flops[0] + flops[-1]) / 2
        calibration = calibrate_thresholds(val_logits, flops, budget_flops=budget)
        result = early_exit(model, images(80, seed=14), calibration.thresholds)
        # On the calibration batch itself every sample leaves where the calibration sent it, except
        # those whose confidence is a threshold (the search picks thresholds among the confidences),
        # which rounding may move by one exit.
        conf = torch.stack([exit_confidence(logits)[0] for logits in val_logits])  # as calibrate computes it
        near = ((conf - calibration.thresholds[:, None]).abs() < 1e-9)[:-1].any(dim=0)
        assert int(near.sum()) <= model.num_exits - 1
        planned = assign_exits(conf, calibration.thresholds)
        assert torch.equal(result.exit_index[~near], planned[~near])
        assert calibration.exit_counts == torch.bincount(planned, minlength=model.num_exits).tolist()
        slack = int(near.sum()) * (flops[-1] - flops[0]) / 80
        assert abs(result.flops_per_image - calibration.expected_flops) <= slack + 1e-6


# host_syncs="once": every exit decided on the device. early_exit offers it for CUDA only; its
# engine runs on any device, so its decisions are checked here on the CPU in float64.

@pytest.mark.parametrize("p", [0.05, 1.0, 1.95])
def test_deciding_on_the_device_gives_the_per_exit_engines_exits_and_logits(p):
    model = build()
    x = images(37, seed=20)
    thresholds = calibrated(model, p)
    per_exit = early_exit(model, x, thresholds)
    levels = early_exit_module._check_thresholds(thresholds, model.num_exits)
    logits, exit_index, exit_counts, stage_batch_sizes = early_exit_module._run_deciding_on_device(
        model, x, levels, "max_softmax")
    assert torch.equal(exit_index, per_exit.exit_index)
    assert exit_counts == per_exit.exit_counts
    assert stage_batch_sizes == [37] * model.num_exits  # nothing is compacted
    # Every sample's logits are its own, from its exit (the batch differs, so the last bits may).
    torch.testing.assert_close(logits, per_exit.logits, rtol=1e-10, atol=1e-12)
    assert logits.shape == (37, 10) and logits.is_contiguous()


def test_host_syncs_once_is_refused_off_cuda_and_unknown_modes_always():
    model = build()
    x = images(3, seed=21)
    with pytest.raises(ValueError, match="host_syncs='once' is for CUDA inputs"):
        early_exit(model, x, [0.5] * 6, host_syncs="once")
    with pytest.raises(ValueError, match="host_syncs must be one of"):
        early_exit(model, x, [0.5] * 6, host_syncs="never")


@requires_cuda_gpu
def test_host_syncs_once_on_cuda_equals_the_per_exit_engine():
    model = build().cuda()
    x = images(41, seed=22).cuda()
    thresholds = calibrated(model, 1.0)
    per_exit = early_exit(model, x, thresholds)
    once = early_exit(model, x, thresholds, host_syncs="once")
    assert torch.equal(once.exit_index, per_exit.exit_index)
    assert once.exit_counts == per_exit.exit_counts
    torch.testing.assert_close(once.logits, per_exit.logits, rtol=1e-10, atol=1e-12)
    flops = ranet_fast.count_flops(build(), 32)
    assert once.flops == pytest.approx(41 * flops[-1], rel=1e-12)  # every stage ran on the whole batch


def test_prefix_views_of_one_buffer_are_copied_once_and_stay_views_of_one_copy():
    """A converted dense block's per-layer outputs are prefix views of its buffer: the compaction
    copies the buffer once and gives back views of the copy, with the rows selected."""
    buffer = torch.randn(6, 10, 3, 3, dtype=torch.float64)
    narrow = torch.randn(6, 4, dtype=torch.float64)
    state = {"h": buffer, "outputs": [buffer[:, :4], buffer[:, :7], buffer], "other": (narrow, narrow)}
    copied = []

    def gather(tensors, index, check_index):
        copied.extend(tensors)
        return [t.index_select(0, index) for t in tensors]

    keep = torch.tensor([4, 0, 5])
    positions = torch.arange(6)
    new_state, new_positions = early_exit_module._compact(state, keep, positions, gather)
    assert len(copied) == 3 and copied[0] is buffer  # the buffer, the narrow tensor, the positions
    assert torch.equal(new_positions, keep)
    assert torch.equal(new_state["h"], buffer[keep])
    for view, original in zip(new_state["outputs"], state["outputs"]):
        assert torch.equal(view, original[keep])
        assert view.untyped_storage().data_ptr() == new_state["h"].untyped_storage().data_ptr()
    assert new_state["other"][0] is new_state["other"][1] and torch.equal(new_state["other"][0], narrow[keep])


def test_a_view_wider_than_its_copy_is_worth_is_copied_alone():
    """One narrow slice of a wide buffer that is not in the state: only the slice is copied."""
    buffer = torch.randn(5, 12, 2, 2, dtype=torch.float64)
    copied = []

    def gather(tensors, index, check_index):
        copied.extend(tensors)
        return [t.index_select(0, index).contiguous() for t in tensors]

    new_state, _ = early_exit_module._compact([buffer[:, 2:3]], torch.tensor([1, 3]), torch.arange(5), gather)
    assert copied[0].shape == (5, 1, 2, 2)
    assert torch.equal(new_state[0], buffer[[1, 3], 2:3])
