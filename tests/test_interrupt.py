"""Interrupted training: SIGTERM/SIGINT finish the step, save and exit; SIGKILL leaves the previous
checkpoint; --resume continues mid-epoch and ends with the weights and scores of an uninterrupted run.

The trainer runs in subprocesses in a session of their own, and the signals go to the whole
process group (the trainer and its data-loader worker), as a scheduler or a terminal sends them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import ranet_fast.train.__main__ as trainer
from ranet_fast.checkpoint import load_checkpoint
from ranet_fast.train.interrupt import GracefulStop
from ranet_fast.train.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
# 64 training images in batches of 4: 16 steps per epoch, so a signal sent after step 3 lands
# well inside the epoch even on a busy machine. One loader worker: the replay on resume must reproduce its generator
# state too, and it must survive the signal sent to the whole process group.
FLAGS = ["--data", "synthetic", "--synthetic-size", "64,16,16", "-b", "4", "-j", "1", "-p", "1",
         "--nChannels", "4", "--growthRate", "4", "--step", "1", "--nBlocks", "1", "--block-step", "1",
         "--device", "cpu", "--epochs", "2"]
TIMEOUT = 120


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _start(save: Path, *extra: str, code: str | None = None) -> subprocess.Popen:
    launcher = ["-c", code] if code else ["-m", "ranet_fast.train"]
    return subprocess.Popen([sys.executable, *launcher, *FLAGS, "--save", str(save), *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(process: subprocess.Popen, marker: str) -> str:
    """Read stdout until a line contains ``marker``; kills the process if it never comes."""
    timer = threading.Timer(TIMEOUT, process.kill)
    timer.start()
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if marker in line:
                return "".join(seen)
    finally:
        timer.cancel()
    process.wait()
    raise AssertionError(f"{marker!r} never appeared; stdout:\n{''.join(seen)[-3000:]}\n"
                         f"stderr:\n{process.stderr.read()[-3000:]}")


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def _run(save: Path, *extra: str) -> None:
    returncode, out, err = _finish(_start(save, *extra))
    assert returncode == 0, err[-3000:]


def _checkpoint(save: Path, name: str) -> dict:
    return load_checkpoint(save / "save_models" / name)


def _assert_same_training(save: Path, reference: Path) -> None:
    ours, theirs = _checkpoint(save, "checkpoint_001.pth.tar"), _checkpoint(reference, "checkpoint_001.pth.tar")
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], theirs["state_dict"][k]) for k in ours["state_dict"])
    momentum = [s["momentum_buffer"] for s in ours["optimizer"]["state"].values()]
    expected = [s["momentum_buffer"] for s in theirs["optimizer"]["state"].values()]
    assert len(momentum) == len(expected) > 0 and all(map(torch.equal, momentum, expected))
    assert ours["scores"] == theirs["scores"]
    assert (save / "scores.tsv").read_text() == (reference / "scores.tsv").read_text()
    ours_results = json.loads((save / "results.json").read_text())
    theirs_results = json.loads((reference / "results.json").read_text())
    assert ours_results["anytime"] == theirs_results["anytime"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("uninterrupted")
    _run(save)
    return save


def test_sigterm_then_sigint_mid_epoch_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, capsys):
    save = tmp_path / "interrupted"
    models = save / "save_models"

    first = _start(save)
    _wait_for(first, "Epoch: [0][3/16]")
    os.killpg(first.pid, signal.SIGTERM)
    returncode, _, err = _finish(first)
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM; finishing the current step" in err and "continue with --resume" in err
    assert (models / "latest.txt").read_text().strip() == str(models / "interrupted.pth.tar")
    stopped = _checkpoint(save, "interrupted.pth.tar")
    entry = stopped["interrupted"]
    # Nothing completed yet; the epoch stopped after the step the marker reported or a later one.
    assert stopped["epoch"] == -1 and entry["epoch"] == 0 and 3 <= entry["step"] < 16
    assert entry["num_batches"] == 16 and entry["world_size"] == 1 and entry["batch_size"] == 4
    assert len(entry["ranks"]) == 1 and entry["ranks"][0]["totals"]["count"] == 4 * entry["step"]
    assert not list(models.glob("checkpoint_*")) and not list(save.rglob("*.tmp"))

    # Continuing the epoch with another batch size or epoch length would train on other batches:
    # refused, and the run's files stay as they were.
    mismatch = tmp_path / "mismatch"
    shutil.copytree(save, mismatch)
    files = {p: p.read_bytes() for p in mismatch.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as caught:
        trainer.main(FLAGS + ["--save", str(mismatch), "--resume", "-b", "8", "-j", "0"])
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert "interrupted.pth.tar" in error and "--batch-size 4" in error and "this run has 1 and 8" in error
    with pytest.raises(SystemExit) as caught:
        trainer.main(FLAGS + ["--save", str(mismatch), "--resume", "--max-steps-per-epoch", "5", "-j", "0"])
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert "interrupted.pth.tar" in error and "of an epoch of 16 batches, but this run's epochs have 5" in error
    assert {p: p.read_bytes() for p in mismatch.rglob("*") if p.is_file()} == files

    second = _start(save, "--resume")
    log = _wait_for(second, "Epoch: [1][3/16]")
    assert f"continuing epoch 0 at step {entry['step']}" in log
    os.killpg(second.pid, signal.SIGINT)
    returncode, _, err = _finish(second)
    assert returncode == 128 + signal.SIGINT, err[-3000:]
    stopped = _checkpoint(save, "interrupted.pth.tar")
    assert stopped["epoch"] == 0 and stopped["interrupted"]["epoch"] == 1
    # The completed epoch's checkpoint stays until the next one replaces it.
    assert sorted(p.name for p in models.glob("checkpoint_*")) == ["checkpoint_000.pth.tar"]

    _run(save, "--resume")
    assert sorted(p.name for p in models.iterdir() if p.name.startswith(("checkpoint", "interrupted"))) == [
        "checkpoint_001.pth.tar"]
    assert (models / "latest.txt").read_text().strip() == str(models / "checkpoint_001.pth.tar")
    _assert_same_training(save, uninterrupted)


# Runs the trainer with torch.save slowed down for the epoch-1 checkpoint: it writes a few bytes,
# announces itself and sleeps, so that the test can SIGKILL the process in the middle of the write.
SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch
    real_save = torch.save
    def slow_save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 1 and "state_dict" in obj:
            handle.write(b"partial")
            handle.flush()
            print("WRITING CHECKPOINT 1", flush=True)
            time.sleep(600)
        return real_save(obj, handle, *args, **kwargs)
    torch.save = slow_save
    from ranet_fast.train.__main__ import main
    main(sys.argv[1:])
""")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_recovers(uninterrupted, tmp_path):
    save = tmp_path / "killed"
    models = save / "save_models"
    process = _start(save, code=SLOW_SAVE)
    _wait_for(process, "WRITING CHECKPOINT 1")
    os.killpg(process.pid, signal.SIGKILL)
    returncode, _, _ = _finish(process)
    assert returncode == -signal.SIGKILL
    # The write was cut short in its temporary file; the destination was never touched.
    assert (models / "latest.txt").read_text().strip() == str(models / "checkpoint_000.pth.tar")
    assert not (models / "checkpoint_001.pth.tar").exists()
    leftovers = list(models.glob(".checkpoint_001.pth.tar.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"partial"
    assert _checkpoint(save, "checkpoint_000.pth.tar")["epoch"] == 0

    _run(save, "--resume")
    _assert_same_training(save, uninterrupted)


def test_graceful_stop_defers_the_first_signal_and_a_second_sigint_stops_at_once():
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop(Runtime(device=torch.device("cpu"))) as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous


def test_partial_epoch_resume_replays_data_and_restores_random_state():
    """train_epoch stopped after 2 steps and continued from the PartialEpoch equals one whole epoch,
    for a model that draws random numbers (dropout) and a loader that shuffles."""
    from torch import nn
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from ranet_fast.train import parse_args
    from ranet_fast.train.loop import PartialEpoch, Progress, build_optimizer, prepare_epoch, train_epoch

    class DropoutExits(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 6)),
                                             nn.Sequential(nn.Flatten(), nn.Linear(12, 6))])

        def forward(self, x):
            return [exit(x) for exit in self.classifier]

    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(40, 3, 2, 2, generator=generator),
                            torch.randint(0, 6, (40,), generator=generator))
    args = parse_args(["--data", "synthetic", "--epochs", "3", "--lr", "0.1", "-p", "100"])
    progress = Progress(enabled=False, print_freq=100)

    def setup():
        torch.manual_seed(3)
        model = DropoutExits()
        loader = DataLoader(dataset, batch_size=8, sampler=RandomSampler(dataset, generator=torch.Generator()),
                            generator=torch.Generator())
        return model, loader, build_optimizer(args, model.parameters())

    def run_epoch(model, loader, optimizer, **kwargs):
        prepare_epoch(loader, args.seed, 1)
        return train_epoch(model, loader, optimizer, 1, args, num_exits=2, device=torch.device("cpu"),
                           progress=progress, **kwargs)

    model, loader, optimizer = setup()
    whole = run_epoch(model, loader, optimizer)

    resumed, loader, resumed_optimizer = setup()
    calls = []
    partial = run_epoch(resumed, loader, resumed_optimizer, stop=lambda: calls.append(1) or len(calls) == 2)
    assert isinstance(partial, PartialEpoch) and partial.step == 2 and partial.num_batches == 5
    torch.manual_seed(99)  # a new process starts from other generator states
    rest = run_epoch(resumed, loader, resumed_optimizer, resume=partial)
    assert rest == whole
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
