"""MSDNet: parity with the official kalviny/MSDNet-PyTorch code through golden data it produced,
staged execution for early exit, validation of the flags, and the trainer with --arch MSDNet.

tests/golden/ holds, for the official README's configurations (CIFAR-10/100 anytime, CIFAR-100
lin_grow, ImageNet) and a prune='min' / no-bottleneck variant, what the official code computed for
fixed weights and inputs: state_dict layout, per-exit logits in eval and train mode, running
statistics after a train-mode forward and op_counter FLOPs; and the official initial weights for a
seed. The weights are regenerated here from the recorded layout.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

import ranet_fast.train.__main__ as trainer
from golden.common import (INIT_SEED, INITIAL_WEIGHTS_PATHS, MSDNET_CONFIGS, assert_eval_logits_match,
                           assert_train_forward_matches, golden_input, golden_weights, image_size, load_golden,
                           make_args, state_dict_fingerprint)
from ranet_fast import count_flops
from ranet_fast.checkpoint import load_official_checkpoint
from ranet_fast.inference import early_exit
from ranet_fast.models import MSDNET_CONFIGS as README_CONFIGS
from ranet_fast.models import MSDNet, build_model, msdnet_config, plan_msdnet, validate_msdnet_args
from ranet_fast.train import parse_args
from model_testing import assert_matches_simulation, calibrated, images, randomize_eval_bn

NAMES = sorted(MSDNET_CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def golden_case(request):
    """One model per configuration, its golden data and the recorded weights; each test loads the
    weights afresh before using the model."""
    name = request.param
    golden = load_golden(name)
    layout, weights = golden_weights(golden)
    model = MSDNet(make_args(name))
    assert model.num_exits == golden["num_exits"]
    return name, golden, layout, weights, model


def test_state_dict_layout_is_official(golden_case):
    _, _, layout, _, model = golden_case
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == layout


def test_eval_logits_equal_official(golden_case):
    name, golden, _, weights, model = golden_case
    model.load_state_dict(weights, strict=True)
    assert_eval_logits_match(model, golden, golden_input(name))


def test_train_logits_and_running_statistics_equal_official(golden_case):
    name, golden, _, weights, model = golden_case
    model.load_state_dict(weights, strict=True)
    assert_train_forward_matches(model, golden, golden_input(name))


def test_flops_and_parameters_equal_official_op_counter(golden_case):
    name, golden, _, _, model = golden_case
    flops = count_flops(model, image_size(name))
    assert len(flops) == len(golden["flops"])
    for ours, official in zip(flops, golden["flops"]):
        assert ours == pytest.approx(official, rel=1e-9)
    assert sum(p.numel() for p in model.parameters()) == golden["total_params"] == golden["params"][-1]


def test_official_data_parallel_checkpoint_loads_strictly(golden_case, tmp_path):
    """The official main.py saves DataParallel's state_dict ('module.' prefixes) under 'state_dict'."""
    name, golden, layout, weights, _ = golden_case
    path = tmp_path / "model_best.pth.tar"
    prefixed = OrderedDict((f"module.{key}", weights[key]) for key, _ in layout)
    torch.save({"epoch": 0, "arch": "msdnet", "state_dict": prefixed, "best_prec1": 0.0}, path)
    model = MSDNet(make_args(name))
    load_official_checkpoint(model, str(path))
    assert_eval_logits_match(model, golden, golden_input(name))


@pytest.mark.parametrize("name", sorted(torch.load(INITIAL_WEIGHTS_PATHS["MSDNet"], weights_only=True)))
def test_same_seed_gives_the_official_initial_weights(name):
    official = torch.load(INITIAL_WEIGHTS_PATHS["MSDNet"], weights_only=True)[name]
    torch.manual_seed(INIT_SEED)
    state = MSDNet(make_args(name)).state_dict()
    assert torch.equal(state_dict_fingerprint(state, list(state)), official)


@pytest.mark.parametrize("readme, golden_name, overrides", [
    ("cifar", "msdnet-cifar100", {}),
    ("cifar", "msdnet-cifar10", {"data": "cifar10"}),
    ("cifar-batch", "msdnet-cifar100-lin-grow", {}),
    ("imagenet", "msdnet-imagenet", {}),
])
def test_msdnet_config_matches_the_readme_commands(readme, golden_name, overrides):
    ours = vars(msdnet_config(readme, **overrides))
    for field, value in MSDNET_CONFIGS[golden_name].items():
        assert ours[field] == value, field


def test_readme_configurations_have_the_documented_exits_and_layers():
    # Block layers: README anytime 'step 2, base 4' x 7 blocks; lin_grow 'step 1, base 1': 1, 2, 3, 4, 5.
    assert [len([l for l in block if not l.transition]) for block in plan_msdnet(msdnet_config("cifar"))] \
        == [4, 2, 2, 2, 2, 2, 2]
    assert [len([l for l in block if not l.transition]) for block in plan_msdnet(msdnet_config("cifar-batch"))] \
        == [1, 2, 3, 4, 5]
    assert set(README_CONFIGS) == {"cifar", "cifar-batch", "imagenet"}
    with pytest.raises(ValueError, match="cifar-huge"):
        msdnet_config("cifar-huge")


# Staged execution (the early-exit engine's interface) --------------------------------------------

def _small(**overrides):
    """A small but complete MSDNet: 3 scales, pruning, transitions, 4 exits."""
    return msdnet_config("cifar-batch", nBlocks=4, nChannels=8, growthRate=4, data="cifar10", **overrides)


def _leaves(state) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(state)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    return leaves


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_equals_the_official_block_chain(mode):
    """The official forward runs each block as one nn.Sequential on the previous block's output;
    ours runs the stages. Same operations in the same order: bitwise the same logits (and, in
    train mode, the same running statistics)."""
    torch.manual_seed(0)
    model = MSDNet(_small(prune="min")).double().train(mode == "train")
    reference = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        features, official = x, []
        for block, classifier in zip(reference.blocks, reference.classifier):
            features = block(features)
            official.append(classifier(features))
    for a, b in zip(ours, official):
        assert torch.equal(a, b)
    state, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_staged_execution_equals_forward_and_state_ends_empty():
    torch.manual_seed(0)
    model = MSDNet(_small()).double().eval()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        state = model.early_exit_start(x)
        for k in range(model.num_exits):
            assert all(t.shape[0] == 5 for t in _leaves(state))
            logits, state = model.early_exit_stage(k, state)
            assert torch.equal(logits, full[k])
    assert model.num_exits == 4 and _leaves(state) == []


def test_compacted_state_gives_the_full_forward_rows():
    """An engine keeps only the samples that did not exit: index_select every tensor of the state
    on the rows still running, continue, and those rows' logits equal the full forward's."""
    torch.manual_seed(0)
    model = MSDNet(_small()).double().eval()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    keep_after = [torch.tensor([0, 2, 3, 5, 6, 7]), torch.tensor([1, 2, 4]), torch.tensor([2])]
    with torch.no_grad():
        full = model(x)
        rows = torch.arange(8)
        state = model.early_exit_start(x)
        for k in range(model.num_exits):
            logits, state = model.early_exit_stage(k, state)
            torch.testing.assert_close(logits, full[k][rows], rtol=1e-12, atol=1e-12)
            if k < len(keep_after):
                keep = keep_after[k]
                state = tree_map(lambda t: t.index_select(0, keep), state)
                rows = rows[keep]


def _engine_model(dtype=torch.float64, **overrides):
    """A small MSDNet in eval mode with random BN affine parameters and statistics, so that no
    layer is the identity it starts as (as tests/test_early_exit.py builds its RANets)."""
    torch.manual_seed(0)
    model = MSDNet(_small(**overrides)).to(dtype).eval()
    randomize_eval_bn(model, 1, dtype)
    return model


@pytest.mark.parametrize("prune", ["max", "min"])
@pytest.mark.parametrize("p", [0.5, 1.0, 1.95])
def test_real_early_exit_matches_the_official_simulation(prune, p):
    """ranet_fast.inference.early_exit on MSDNet picks the exit the official simulation (full
    forwards, first confident exit) picks and returns the same logits, float64."""
    model = _engine_model(prune=prune)
    result = assert_matches_simulation(model, images(53, seed=1), calibrated(model, p))
    if p in (0.5, 1.0):  # mixed budgets really send samples out early and on to the end
        assert result.exit_counts[0] > 0 and result.exit_counts[-1] > 0


def test_real_early_exit_runs_later_blocks_only_on_the_samples_still_running():
    model = _engine_model()
    x = images(40, seed=5)
    thresholds = calibrated(model, 1.0)
    seen = []
    for classifier in model.classifier:  # its input is the list of per-scale features
        classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0][-1].shape[0]))
    # (Counting the FLOPs spent runs a one-image forward, which the hooks would see too.)
    result = early_exit(model, x, thresholds, count_flops_spent=False)
    remaining = [40 - sum(result.exit_counts[:k]) for k in range(model.num_exits)]
    assert result.stage_batch_sizes == remaining and remaining[-1] < 40
    assert seen == [n for n in remaining if n > 0]


def test_real_early_exit_flops_spent_are_the_expected_flops():
    model = _engine_model()
    result = early_exit(model, images(30, seed=6), calibrated(model, 1.0))
    flops = count_flops(model, 32)
    assert result.flops == pytest.approx(sum(c * f for c, f in zip(result.exit_counts, flops)), rel=1e-12)
    assert flops[0] <= result.flops_per_image <= flops[-1]


def test_real_early_exit_float32_channels_last():
    model = _engine_model(torch.float32).to(memory_format=torch.channels_last)
    x = images(24, seed=8, dtype=torch.float32).to(memory_format=torch.channels_last)
    assert_matches_simulation(model, x, calibrated(model, 1.0), rtol=1e-5, atol=1e-5)


def test_early_exit_stage_rejects_an_unknown_exit():
    model = MSDNet(_small())
    state = model.early_exit_start(torch.randn(1, 3, 32, 32))
    for bad in (-1, model.num_exits):
        with pytest.raises(IndexError, match="exit_index"):
            model.early_exit_stage(bad, state)


# Model behaviour ----------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    model = MSDNet(_small(prune="min"))
    sum(l.square().mean() for l in model(torch.randn(2, 3, 32, 32))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_channels_last_and_non_contiguous_inputs_give_the_same_logits():
    torch.manual_seed(0)
    model = MSDNet(_small()).eval().double()
    strided = torch.randn(2, 6, 32, 32, dtype=torch.float64)[:, ::2]
    assert not strided.is_contiguous()
    with torch.no_grad():
        expected = model(strided.contiguous())
        for variant, weights in ((strided, model), (strided.contiguous(memory_format=torch.channels_last),
                                                    copy.deepcopy(model).to(memory_format=torch.channels_last))):
            for ours, ref in zip(weights(variant), expected):
                torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_synthetic_data_and_class_override():
    args = msdnet_config("cifar-batch", data="synthetic", num_classes=7)
    model = build_model(args)
    assert isinstance(model, MSDNet) and all(head.linear.out_features == 7 for head in model.classifier)
    with torch.no_grad():
        assert [tuple(l.shape) for l in model.eval()(torch.randn(1, 3, 32, 32))] == [(1, 7)] * 5


def _flags(**changes):
    args = msdnet_config("cifar-batch")
    for k, v in changes.items():
        setattr(args, k, v)
    args.nScales = len(args.grFactor)  # as the official main.py derives it
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(grFactor=[1, 2, 4], bnFactor=[1, 2]), "same, non-zero number of entries"),
    (dict(grFactor=[1, 0, 4]), "--grFactor entries must be positive"),
    (dict(stepmode="lg"), "--stepmode must be 'even' or 'lin_grow'"),
    (dict(prune="none"), "--prune"),
    (dict(base=0), "--base"),
    (dict(nBlocks=0), "--nBlocks"),
    (dict(growthRate=0), "--growthRate"),
    (dict(bottleneck="False"), "--bottleneck must be True or False"),
    (dict(reduction=1.5), "--reduction"),
    (dict(data="mnist"), "--data"),
    (dict(growthRate=5, grFactor=[2, 1, 4], bnFactor=[1, 2, 4]), "scale 1 grows by .* 5 channels"),
    (dict(grFactor=[1, 2], bnFactor=[1, 2]), "reaches them at 16x16"),
    (dict(grFactor=[1, 2, 4, 4], bnFactor=[1, 2, 4, 4]), "reaches them at 4x4"),
    (dict(data="ImageNet"), "reaches them at 14x14"),
    (dict(grFactor="1-2-4", bnFactor="1-2-4"), "not parsed into a list of int; apply finish_msdnet_args"),
])
def test_invalid_configurations_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        validate_msdnet_args(_flags(**changes))
    with pytest.raises(ValueError, match=message):
        MSDNet(_flags(**changes))


def test_odd_growth_is_allowed_where_no_scale_is_split():
    # Scale 0 never has a down-sampling input, so only the coarser scales' growth must be even.
    model = MSDNet(_flags(growthRate=3, grFactor=[1, 2, 4])).eval()
    with torch.no_grad():
        assert [tuple(l.shape) for l in model(torch.randn(1, 3, 32, 32))] == [(1, 100)] * 5


# Trainer --------------------------------------------------------------------------------------------

TINY = ["--arch", "MSDNet", "--data", "synthetic", "--synthetic-size", "32,16,16", "-b", "16", "-j", "0",
        "--nChannels", "4", "--growthRate", "4", "--nBlocks", "2", "--base", "1", "--step", "1",
        "--stepmode", "even", "--device", "cpu"]
README_IMAGENET = ["--data-root", "X", "--data", "ImageNet", "--save", "S", "--arch", "msdnet", "--batch-size", "256",
                   "--epochs", "90", "--nBlocks", "5", "--stepmode", "even", "--step", "4", "--base", "4",
                   "--nChannels", "32", "--growthRate", "16", "--grFactor", "1-2-4-4", "--bnFactor", "1-2-4-4",
                   "--use-valid", "--gpu", "0,1,2,3", "-j", "16"]


def test_readme_command_parses_like_the_official_args():
    args = parse_args(README_IMAGENET)
    assert args.arch == "MSDNet"
    for field, value in MSDNET_CONFIGS["msdnet-imagenet"].items():
        assert getattr(args, field) == value, field
    # Official MSDNet defaults of the flags RANet's args.py also has, and of MSDNet's own.
    defaults = parse_args(["--arch", "MSDNet"])
    assert (defaults.nBlocks, defaults.nChannels, defaults.grFactor, defaults.bnFactor, defaults.step,
            defaults.stepmode, defaults.base, defaults.prune, defaults.bottleneck, defaults.reduction,
            defaults.growthRate) == (1, 32, [1, 2, 4], [1, 2, 4], 1, None, 4, "max", True, 0.5, 6)
    assert parse_args(["--arch", "MSDNet", "--bottleneck", "False"]).bottleneck is False
    # RANet's defaults are untouched.
    ranet = parse_args([])
    assert (ranet.arch, ranet.nBlocks, ranet.grFactor, ranet.stepmode) == ("RANet", 2, [4, 2, 1], "even")


@pytest.mark.parametrize("flags, named", [
    (["--stepmode", "lg"], "--stepmode must be 'even' or 'lin_grow'"),
    (["--grFactor", "1-2", "--bnFactor", "1-2-4"], "--grFactor and --bnFactor"),
    (["--bottleneck", "maybe"], "--bottleneck"),
])
def test_inconsistent_msdnet_flags_exit_2_with_a_one_line_error(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--arch", "MSDNet"] + flags)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_trainer_trains_and_evaluates_a_tiny_msdnet(tmp_path):
    save = tmp_path / "run"
    trainer.main(TINY + ["--epochs", "1", "--save", str(save)])
    models = save / "save_models"
    checkpoint = torch.load(models / "checkpoint_000.pth.tar", map_location="cpu", weights_only=True)
    assert checkpoint["arch"] == "MSDNet" and checkpoint["args"]["base"] == 1
    model = MSDNet(parse_args(TINY))
    model.load_state_dict(checkpoint["state_dict"], strict=True)

    results = json.loads((save / "results.json").read_text())
    assert results["num_exits"] == 2 and [row["exit"] for row in results["anytime"]] == [1, 2]
    assert results["flops"] == count_flops(model, 32)
    assert results["params"] == sum(p.numel() for p in model.parameters())
    assert len(results["dynamic"]) == 39
    # Dynamic evaluation also ran MSDNet through the real early-exit engine at every budget.
    real = results["early_exit"]
    assert real["images"] == 16 and len(real["budgets"]) == 39
    assert all(sum(budget["exit_counts"]) == 16 for budget in real["budgets"])
    assert (save / "scores.tsv").read_text().count("\n") == 2

    evaluated = tmp_path / "eval"
    trainer.main(TINY + ["--evalmode", "both", "--evaluate-from", str(models / "model_best.pth.tar"),
                         "--save", str(evaluated)])
    again = json.loads((evaluated / "results.json").read_text())
    assert again["anytime"] == results["anytime"] and again["dynamic"] == results["dynamic"]
    assert (evaluated / "AnytimeResults.txt").exists() and (evaluated / "dynamic.txt").exists()
