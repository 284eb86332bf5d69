"""ranet-train end to end on CPU with tiny RANets and small synthetic data sets.

Covers: a full run's files, the official README command line, exact --resume after a crash,
--evalmode on ranet_fast and official ('module.'-prefixed) checkpoints, clear errors for bad flags,
missing data and corrupt checkpoints, the learning-rate schedule, and a 2-process torchrun run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ranet_fast.train.__main__ as trainer
from ranet_fast.train import parse_args
from ranet_fast.train.loop import learning_rate

# One dense block per scale flow keeps the model small: 3 exits, 0.5 M parameters (mostly the
# CIFAR classifiers' fixed 128 channels), 3.5 MFLOPs per image.
TINY = ["--data", "synthetic", "--synthetic-size", "32,16,16", "-b", "16", "-j", "0",
        "--nChannels", "4", "--growthRate", "4", "--step", "1", "--nBlocks", "1", "--block-step", "1",
        "--device", "cpu"]
README_CIFAR = ["--arch", "RANet", "--gpu", "0", "--data-root", "X", "--data", "cifar10", "--step", "2",
                "--nChannels", "16", "--stepmode", "lg", "--scale-list", "1-2-3", "--grFactor", "4-2-1",
                "--bnFactor", "4-2-1"]
SCORE_ROW = re.compile(r"^\d+\t\d+\.\d{3}(\t-?\d+\.\d{4}){6}$")


@pytest.fixture(autouse=True)
def _restore_cuda_visible_devices():
    # main() applies --gpu to CUDA_VISIBLE_DEVICES like the official script; undo it per test.
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    yield
    if saved is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """Two uninterrupted epochs (the reference for the resume test and the smoke checks)."""
    save = tmp_path_factory.mktemp("straight")
    trainer.main(TINY + ["--epochs", "2", "--save", str(save)])
    return save


def test_training_run_writes_checkpoints_scores_results_and_plot(straight_run):
    save = straight_run
    models = save / "save_models"
    # Only the latest per-epoch checkpoint is kept, as in the official code.
    assert sorted(p.name for p in models.glob("checkpoint_*")) == ["checkpoint_001.pth.tar"]
    assert (models / "latest.txt").read_text().strip().endswith("checkpoint_001.pth.tar")
    assert (models / "model_best.pth.tar").exists() and (models / "best_model_epoch.txt").exists()
    assert not [p for p in save.rglob("*.tmp")]

    checkpoint = _load(models / "checkpoint_001.pth.tar")
    assert {"epoch", "arch", "state_dict", "best_prec1", "optimizer", "args", "rng"} <= checkpoint.keys()
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "RANet"
    assert checkpoint["args"]["scale_list"] == [1, 2, 3] and checkpoint["args"]["data"] == "synthetic"
    assert {"torch", "numpy", "python"} <= checkpoint["rng"].keys()

    lines = (save / "scores.tsv").read_text().splitlines()
    assert lines[0] == "epoch\tlr\ttrain_loss\tval_loss\ttrain_prec1\tval_prec1\ttrain_prec5\tval_prec5"
    assert len(lines) == 3 and all(SCORE_ROW.match(line) for line in lines[1:])
    # multistep on CIFAR-like data with 2 epochs: epoch 1 is past 50% of training.
    assert [line.split("\t")[1] for line in lines[1:]] == ["0.100", "0.010"]

    results = json.loads((save / "results.json").read_text())
    from ranet_fast import count_flops
    from ranet_fast.models import RANet

    args = parse_args(TINY)
    model = RANet(args)
    assert results["flops"] == count_flops(model, 32) == _load(save / "flops.pth")
    assert results["params"] == sum(p.numel() for p in model.parameters())
    assert results["num_exits"] == len(model.classifier) == 3
    assert [row["exit"] for row in results["anytime"]] == [1, 2, 3]
    assert len(results["dynamic"]) == 39 and results["data"] == "synthetic"
    assert results["args"]["grFactor"] == [4, 2, 1] and results["args"]["nBlocks"] == 1
    # The last epoch validated the final model on the val split, which is the test split here.
    val_prec1 = float(lines[-1].split("\t")[5])
    assert val_prec1 == pytest.approx(results["anytime"][-1]["top1"], abs=5e-5)

    anytime = (save / "AnytimeResults.txt").read_text().splitlines()
    assert anytime[0] == "AnytimeResults" and len(anytime) == 4
    assert re.match(r"^ @1\*\* flops \d+\.\d\dM prec@1 \d+\.\d{3} prec@5 \d+\.\d{3}$", anytime[1])
    dynamic = (save / "dynamic.txt").read_text().splitlines()
    assert len(dynamic) == 39 and all(len(line.split("\t")) == 2 for line in dynamic)
    # Real early exit ran at every budget on the whole (16-image) test split.
    real = results["early_exit"]
    assert real["images"] == 16 and real["full_network_images_per_s"] > 0 and len(real["budgets"]) == 39
    for simulated, measured in zip(results["dynamic"], real["budgets"]):
        assert measured["p"] == simulated["p"] and measured["images_per_s"] > 0
        assert sum(measured["exit_counts"]) == 16
        # The thresholds are confidences of these very images (val split = test split here), so the
        # image that set a threshold may land one exit away from the simulation by rounding: at
        # most one per threshold, each moving between two neighbouring counts.
        moved = sum(abs(a - b) for a, b in zip(measured["exit_counts"], simulated["exit_counts"]))
        assert moved <= 2 * (results["num_exits"] - 1)
        if moved == 0:
            assert measured["top1"] == pytest.approx(simulated["test_accuracy"], abs=1e-9)
            assert measured["flops_per_image"] == pytest.approx(simulated["expected_flops"], rel=1e-9)
    assert (save / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_a_crash_matches_an_uninterrupted_run(straight_run, tmp_path, monkeypatch):
    save = tmp_path / "resumed"
    real_train_epoch = trainer.train_epoch

    def crash_in_second_epoch(model, loader, optimizer, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt("simulated crash")
        return real_train_epoch(model, loader, optimizer, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.main(TINY + ["--epochs", "2", "--save", str(save)])
    monkeypatch.undo()
    assert (save / "save_models" / "latest.txt").read_text().strip().endswith("checkpoint_000.pth.tar")

    trainer.main(TINY + ["--epochs", "2", "--save", str(save), "--resume"])

    resumed = _load(save / "save_models" / "checkpoint_001.pth.tar")
    straight = _load(straight_run / "save_models" / "checkpoint_001.pth.tar")
    assert _state_dicts_equal(resumed["state_dict"], straight["state_dict"])
    assert resumed["scores"] == straight["scores"]
    assert (save / "scores.tsv").read_text() == (straight_run / "scores.tsv").read_text()
    momentum = [state["momentum_buffer"] for state in resumed["optimizer"]["state"].values()]
    reference = [state["momentum_buffer"] for state in straight["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, reference, strict=True))


def test_evaluate_from_ranet_fast_and_official_checkpoints(straight_run, tmp_path):
    expected = json.loads((straight_run / "results.json").read_text())
    checkpoint = _load(straight_run / "save_models" / "checkpoint_001.pth.tar")
    # The official script saves a DataParallel model: every key starts with 'module.'.
    official = {"epoch": 1, "arch": "RANet", "best_prec1": 0.0, "optimizer": checkpoint["optimizer"],
                "state_dict": OrderedDict(("module." + k, v) for k, v in checkpoint["state_dict"].items())}
    official_path = tmp_path / "official.pth.tar"
    torch.save(official, official_path)

    for name, path in (("ours", straight_run / "save_models" / "checkpoint_001.pth.tar"),
                       ("official", official_path)):
        save = tmp_path / name
        trainer.main(TINY + ["--evalmode", "both", "--evaluate-from", str(path), "--save", str(save)])
        results = json.loads((save / "results.json").read_text())
        assert results["anytime"] == expected["anytime"]
        assert results["dynamic"] == expected["dynamic"]
        assert (save / "AnytimeResults.txt").exists() and (save / "dynamic.txt").exists()
        assert (save / "accuracy_vs_flops.png").exists()
        assert not (save / "save_models").exists()  # evaluation does not train

    save = tmp_path / "anytime-only"
    trainer.main(TINY + ["--evalmode", "anytime", "--evaluate-from", str(official_path), "--save", str(save)])
    results = json.loads((save / "results.json").read_text())
    assert results["anytime"] == expected["anytime"] and results["dynamic"] is None
    assert not (save / "dynamic.txt").exists()


def test_official_readme_command_parses_like_the_official_args():
    args = parse_args(README_CIFAR)
    assert args.arch == "RANet" and args.gpu == "0" and args.data == "cifar10" and args.data_root == "X"
    assert args.step == 2 and args.stepmode == "lg" and args.nChannels == 16 and args.growthRate == 6
    assert args.scale_list == [1, 2, 3] and args.grFactor == [4, 2, 1] and args.bnFactor == [4, 2, 1]
    assert args.nScales == 3 and args.num_classes == 10 and args.splits == ["train", "val"]
    # Official defaults of the flags the command leaves out.
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.weight_decay) == (300, 64, 0.1, 0.9, 1e-4)
    assert (args.nBlocks, args.block_step, args.reduction, args.compress_factor) == (2, 2, 0.5, 0.25)
    assert args.lr_type == "multistep" and args.decay_rate == 0.1 and args.optimizer == "sgd"
    assert args.resume is None and args.evalmode is None and args.bnAfter is True and args.workers == 4
    assert args.print_freq == 10 and args.seed == 0 and args.start_epoch == 0 and not args.use_valid
    imagenet = parse_args(["--data", "ImageNet", "--use-valid", "-p", "5", "--wd", "5e-5",
                           "--learning-rate", "0.5", "--scale-list", "1-2-3-4", "--grFactor", "4-2-2-1",
                           "--bnFactor", "4-2-2-1", "--step", "8", "--growthRate", "16", "--nChannels", "32"])
    assert imagenet.num_classes == 1000 and imagenet.splits == ["train", "val", "test"]
    assert imagenet.print_freq == 5 and imagenet.weight_decay == 5e-5 and imagenet.lr == 0.5


def test_official_readme_command_runs_on_synthetic_data(tmp_path):
    command = [("synthetic" if arg == "cifar10" else arg) for arg in README_CIFAR]
    save = tmp_path / "readme"
    trainer.main(command + ["--epochs", "1", "--max-steps-per-epoch", "1", "--synthetic-size", "16,8,8",
                            "-b", "8", "-j", "0", "--device", "cpu", "--save", str(save)])
    results = json.loads((save / "results.json").read_text())
    assert results["num_exits"] == len(results["anytime"]) == len(results["flops"])
    assert (save / "save_models" / "checkpoint_000.pth.tar").exists()


def test_amp_channels_last_adam_cosine_and_max_steps(tmp_path, monkeypatch):
    import ranet_fast.train.loop as loop

    learning_rates = []
    real_set = loop.set_learning_rate

    def recording_set(optimizer, lr):  # called once per training batch
        learning_rates.append(lr)
        real_set(optimizer, lr)

    monkeypatch.setattr(loop, "set_learning_rate", recording_set)
    save = tmp_path / "options"
    trainer.main(TINY + ["-b", "8", "--epochs", "2", "--max-steps-per-epoch", "2", "--amp", "bf16",
                         "--channels-last", "--optimizer", "adam", "--lr-type", "cosine", "--lr", "0.01",
                         "--save", str(save)])
    # 32 images in batches of 8 are 4 batches; the epoch stops after 2 and the cosine schedule
    # spans 2 epochs x 2 batches.
    assert learning_rates == pytest.approx([0.005 * (1 + math.cos(math.pi * step / 4)) for step in range(4)])
    rows = [line.split("\t") for line in (save / "scores.tsv").read_text().splitlines()[1:]]
    assert [row[1] for row in rows] == ["0.010", "0.005"] and all(math.isfinite(float(r[2])) for r in rows)
    checkpoint = _load(save / "save_models" / "checkpoint_001.pth.tar")
    assert "exp_avg" in next(iter(checkpoint["optimizer"]["state"].values()))  # Adam state


@pytest.mark.parametrize("flags, named", [
    (["--scale-list", "1-2-3", "--grFactor", "4-2", "--bnFactor", "4-2-1"], ["--grFactor", "--scale-list"]),
    (["--evalmode", "both"], ["--evaluate-from"]),
    (["--grFactor", "4-x-1"], ["--grFactor"]),
])
def test_inconsistent_flags_exit_2_with_a_one_line_error(flags, named, capsys):
    with pytest.raises(SystemExit) as caught:
        trainer.main(TINY + flags)
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ranet-train: error:") and "\n" not in error
    assert all(flag in error for flag in named)


def test_missing_cifar_root_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-cifar-here"
    with pytest.raises(SystemExit) as caught:
        trainer.main(["--data", "cifar10", "--data-root", str(missing), "--epochs", "1", "-j", "0",
                      "--device", "cpu", "--nChannels", "4", "--growthRate", "4", "--step", "1",
                      "--save", str(tmp_path / "save")])
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert "ranet-train: error:" in error and str(missing) in error and "--download" in error


def test_corrupt_checkpoints_give_a_clear_error(straight_run, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pth.tar"
    good = (straight_run / "save_models" / "checkpoint_001.pth.tar").read_bytes()
    corrupt.write_bytes(good[: len(good) // 3])
    with pytest.raises(SystemExit) as caught:
        trainer.main(TINY + ["--evalmode", "anytime", "--evaluate-from", str(corrupt),
                             "--save", str(tmp_path / "eval")])
    assert caught.value.code == 1
    assert re.search(r"corrupt\.pth\.tar.*truncated or corrupt", capsys.readouterr().err)

    # --resume from a run whose latest checkpoint is damaged.
    save = tmp_path / "damaged"
    shutil.copytree(straight_run / "save_models", save / "save_models")
    (save / "save_models" / "latest.txt").write_text(str(save / "save_models" / "checkpoint_001.pth.tar"))
    (save / "save_models" / "checkpoint_001.pth.tar").write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit) as caught:
        trainer.main(TINY + ["--epochs", "3", "--resume", "--save", str(save)])
    assert caught.value.code == 1
    assert "checkpoint_001.pth.tar" in capsys.readouterr().err


def test_learning_rate_follows_the_official_schedule():
    cifar = parse_args(["--data", "synthetic", "--epochs", "300"])
    assert learning_rate(cifar, 149, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cifar, 150, 0, 10) == pytest.approx(0.01)
    assert learning_rate(cifar, 224, 9, 10) == pytest.approx(0.01)
    assert learning_rate(cifar, 225, 0, 10) == pytest.approx(0.001)
    slower = parse_args(["--data", "cifar100", "--epochs", "300", "--decay-rate", "0.5"])
    assert learning_rate(slower, 299, 0, 10) == pytest.approx(0.025)
    imagenet = parse_args(["--data", "ImageNet", "--epochs", "90", "--scale-list", "1-2-3-4",
                          "--grFactor", "4-2-2-1", "--bnFactor", "4-2-2-1"])
    assert [learning_rate(imagenet, e, 0, 10) for e in (0, 29, 30, 60, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001])
    cosine = parse_args(["--lr-type", "cosine", "--epochs", "10", "--lr", "0.2"])
    assert learning_rate(cosine, 0, 0, 5) == pytest.approx(0.2)
    assert learning_rate(cosine, 5, 0, 5) == pytest.approx(0.1)  # half way through 50 batches
    assert learning_rate(cosine, 9, 4, 5) == pytest.approx(0.1 * (1 + math.cos(math.pi * 49 / 50)))


class _TwoExits(nn.Module):
    """A toy multi-exit network: a linear exit on the input, another after a hidden layer."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.classifier = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), nn.Linear(8, 6)])

    def forward(self, x):
        return [self.classifier[0](x), self.classifier[1](self.hidden(x))]


def _toy_setup():
    torch.manual_seed(1)
    images, labels = torch.randn(20, 3, 2, 2), torch.randint(0, 6, (20,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=False)
    args = parse_args(["--data", "synthetic", "--epochs", "4", "--lr", "0.1", "-p", "1"])
    return _TwoExits(), loader, args


def test_train_epoch_is_sgd_on_the_sum_of_exit_losses():
    from ranet_fast.train.loop import Progress, build_optimizer, train_epoch

    model, loader, args = _toy_setup()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(args, model.parameters())
    stats = train_epoch(model, loader, optimizer, 2, args, num_exits=2, device=torch.device("cpu"),
                        progress=Progress(enabled=False, print_freq=1))

    # By hand: epoch 2 of 4 is at 50% of training, so lr = 0.1 * 0.1 for every batch.
    by_hand = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_sum = correct1 = correct5 = 0.0
    for images, labels in loader:
        outputs = reference(images)
        loss = F.cross_entropy(outputs[0], labels) + F.cross_entropy(outputs[1], labels)
        by_hand.zero_grad()
        loss.backward()
        by_hand.step()
        loss_sum += loss.item() * len(labels)
        correct1 += (outputs[1].argmax(1) == labels).sum().item()
        correct5 += (outputs[1].topk(5, 1).indices == labels[:, None]).any(1).sum().item()
    assert _state_dicts_equal(model.state_dict(), reference.state_dict())
    assert stats.lr == pytest.approx(0.01)
    assert stats.loss == pytest.approx(loss_sum / 20)
    assert stats.top1 == pytest.approx(correct1 * 5) and stats.top5 == pytest.approx(correct5 * 5)


def test_validate_reports_every_exit():
    from ranet_fast.train.loop import Progress, validate

    model, loader, args = _toy_setup()
    stats = validate(model, loader, args, num_exits=2, device=torch.device("cpu"),
                     progress=Progress(enabled=False, print_freq=1))
    images, labels = loader.dataset.tensors
    with torch.no_grad():
        outputs = model(images)
    expected_loss = sum(F.cross_entropy(o, labels, reduction="sum") for o in outputs) / 20
    assert stats.loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert stats.top1 == pytest.approx([(o.argmax(1) == labels).float().mean().item() * 100 for o in outputs])
    assert stats.top5 == pytest.approx(
        [(o.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item() * 100 for o in outputs])


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this Python")
def test_torchrun_two_processes_only_rank0_writes(tmp_path):
    save = tmp_path / "ddp"
    logs = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # --standalone: free ports instead of torchrun's fixed 29500, which another run at once would hold.
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3", "-m", "ranet_fast.train",
               *TINY, "--epochs", "1", "--save", str(save)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(rank_logs) == [0, 1]
    assert "epoch 1/1" in rank_logs[0] and "Final prediction results" in rank_logs[0]
    assert rank_logs[1].strip() == ""  # rank 1 trains and validates silently and writes nothing

    lines = (save / "scores.tsv").read_text().splitlines()
    assert len(lines) == 2
    results = json.loads((save / "results.json").read_text())
    # Epoch validation was sharded over the 2 processes and all-reduced; rank 0's full
    # evaluation of the same final model on the same split must agree exactly.
    assert float(lines[1].split("\t")[5]) == pytest.approx(results["anytime"][-1]["top1"], abs=5e-5)
    checkpoint = _load(save / "save_models" / "checkpoint_000.pth.tar")
    assert not any(key.startswith("module.") for key in checkpoint["state_dict"])
