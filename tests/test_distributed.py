"""DistributedDataParallel on the CPU: 2 processes under torchrun (gloo).

* Equivalence: ``train_epoch`` on a DDP-wrapped tiny RANet over a DistributedSampler shard (half the
  global batch per process) ends with the weights of a single-process run on the same global
  batches. BatchNorm decides what "the same" means: each DDP process normalises its half batch with
  that half's statistics (SyncBatchNorm is CUDA-only, and the official DataParallel training does
  the same per GPU), so the single-process reference forwards the two halves of every global batch
  separately ("ghost batches"), averages their losses and, like DDP, keeps rank 0's BN running
  statistics. What remains is the fp32 rounding of the gradient all-reduce (summation order and
  the division by the world size): about 1e-6 after 6 SGD steps at lr 0.005, checked with
  ``rtol=1e-4, atol=1e-5``. (At lr 0.05 this tiny RANet's training is chaotic enough to amplify
  the same rounding to 1e-2 within 6 steps, so the learning rate is kept small.)
* Resume: a torchrun run stopped by SIGTERM mid-epoch (every process of the group gets the signal)
  and resumed under torchrun ends bit-identical to an uninterrupted torchrun run, and only rank 0
  prints or writes files.

The worker of the equivalence test is this module itself, run by torchrun (``__main__`` below).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")

MODEL_FLAGS = ["--data", "synthetic", "--nChannels", "4", "--growthRate", "4", "--step", "1", "--nBlocks", "1",
               "--block-step", "1", "--lr-type", "cosine", "--epochs", "2", "--lr", "0.005"]
GLOBAL_BATCH, NUM_IMAGES, WORLD = 16, 48, 2
TIMEOUT = 180
# --standalone: the rendezvous store and the workers' MASTER_PORT take free ports. torchrun's default
# is the fixed port 29500, so two runs at once on one machine (another pytest, another checkout's CI)
# collide and one fails with "EADDRINUSE ... port: 29500".
TORCHRUN_FLAGS = ["--standalone", "--nproc_per_node", str(WORLD)]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _dataset() -> TensorDataset:
    """Synthetic images with the evaluation transform (no augmentation: every process sees the
    same pixels for a sample as the single process does)."""
    from ranet_fast.data import synthetic

    data = synthetic.SyntheticShapes("train", NUM_IMAGES)
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).float().div(255)
    mean, std = torch.tensor(synthetic.MEAN).view(1, 3, 1, 1), torch.tensor(synthetic.STD).view(1, 3, 1, 1)
    return TensorDataset((images - mean) / std, torch.tensor(data.targets))


def _model_and_args():
    from ranet_fast.models import RANet
    from ranet_fast.train import parse_args

    args = parse_args(MODEL_FLAGS)
    torch.manual_seed(0)
    return RANet(args), args


def _shards(dataset, epoch: int, seed: int) -> list[list[list[int]]]:
    """shards[step][rank]: the indices each process trains on at each step of ``epoch``."""
    per_rank = []
    for rank in range(WORLD):
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        per_rank.append([indices[i:i + GLOBAL_BATCH // WORLD] for i in range(0, len(indices), GLOBAL_BATCH // WORLD)])
    return [list(step) for step in zip(*per_rank)]


def _ddp_worker(output: str) -> None:
    """Run by torchrun: 2 epochs of the trainer's train_epoch on a DDP model; rank 0 saves the result."""
    import torch.distributed as dist
    from torch import nn

    from ranet_fast.train.loop import Progress, build_optimizer, prepare_epoch, train_epoch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, args = _model_and_args()
    network = nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(args, model.parameters())
    dataset = _dataset()
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // WORLD, sampler=sampler)
    losses = []
    for epoch in range(args.epochs):
        prepare_epoch(loader, args.seed, epoch, rank)
        stats = train_epoch(network, loader, optimizer, epoch, args, num_exits=len(model.classifier),
                            device=torch.device("cpu"), progress=Progress(enabled=False, print_freq=10))
        losses.append(stats.loss)
    if rank == 0:
        torch.save({"state_dict": model.state_dict(), "losses": losses}, output)
    dist.destroy_process_group()


def _single_process_reference() -> tuple[dict, list[float]]:
    """The same training in one process on the same global batches, BN statistics per half."""
    from ranet_fast.train.loop import build_optimizer, learning_rate, set_learning_rate

    model, args = _model_and_args()
    optimizer = build_optimizer(args, model.parameters())
    dataset = _dataset()
    model.train()
    losses = []
    for epoch in range(args.epochs):
        steps = _shards(dataset, epoch, args.seed)
        total = 0.0
        for step, halves in enumerate(steps):
            set_learning_rate(optimizer, learning_rate(args, epoch, step, len(steps)))
            optimizer.zero_grad()
            half_losses = []
            for rank, indices in enumerate(halves):
                images, target = dataset[indices]
                loss = sum(F.cross_entropy(output, target) for output in model(images))
                # DDP averages the processes' gradients.
                (loss / WORLD).backward()
                half_losses.append(loss)
                if rank == 0:
                    rank0_buffers = {k: v.clone() for k, v in model.named_buffers()}
                else:  # DDP keeps rank 0's running statistics: undo this half's update
                    for name, buffer in model.named_buffers():
                        buffer.copy_(rank0_buffers[name])
            optimizer.step()
            total += sum(loss.item() for loss in half_losses) * GLOBAL_BATCH / WORLD
        losses.append(total / (len(steps) * GLOBAL_BATCH))
    return model.state_dict(), losses


def test_two_process_ddp_equals_single_process_training_on_the_global_batch(tmp_path):
    output = tmp_path / "ddp.pt"
    command = [TORCHRUN, *TORCHRUN_FLAGS, "-m", "test_distributed", str(output)]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ddp = torch.load(output, weights_only=True)

    # The workers run one thread each; so does the reference, so that only the all-reduce differs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, losses = _single_process_reference()
    finally:
        torch.set_num_threads(threads)
    initial, _ = _model_and_args()
    assert ddp["state_dict"].keys() == reference.keys()
    # Training moved the weights far beyond the tolerance, so agreeing within it means something.
    moved = max((reference[name] - value).abs().max().item() for name, value in initial.named_parameters())
    assert moved > 1e-3
    for name, value in reference.items():
        torch.testing.assert_close(ddp["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert ddp["losses"] == pytest.approx(losses, rel=1e-5)


FLAGS = ["--data", "synthetic", "--synthetic-size", "48,16,16", "-b", "8", "-j", "0", "-p", "1",
         "--nChannels", "4", "--growthRate", "4", "--step", "1", "--nBlocks", "1", "--block-step", "1",
         "--device", "cpu", "--epochs", "2"]


def _torchrun(save: Path, logs: Path, *extra: str) -> subprocess.Popen:
    command = [TORCHRUN, *TORCHRUN_FLAGS, "--log-dir", str(logs), "--tee", "3",
               "-m", "ranet_fast.train", *FLAGS, "--save", str(save), *extra]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _rank_logs(logs: Path, stream: str) -> dict[int, str]:
    return {int(p.parent.name): p.read_text() for p in logs.rglob(f"{stream}.log")}


def test_ddp_run_stopped_by_sigterm_resumes_under_torchrun_to_the_uninterrupted_result(tmp_path):
    straight = tmp_path / "straight"
    process = _torchrun(straight, tmp_path / "logs-straight")
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-3000:]

    save, logs = tmp_path / "stopped", tmp_path / "logs-stopped"
    process = _torchrun(save, logs)
    timer = threading.Timer(TIMEOUT, process.kill)
    timer.start()
    try:  # 48 images, 8 per global batch: 6 steps per epoch
        assert any("Epoch: [0][2/6]" in line for line in process.stdout)
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate()
    finally:
        timer.cancel()
    assert process.returncode != 0
    errors = _rank_logs(logs, "stderr")
    assert "received SIGTERM" in errors[0] and "continue with --resume" in errors[0]
    assert "received SIGTERM" not in errors[1]
    stopped = torch.load(save / "save_models" / "interrupted.pth.tar", weights_only=True)
    entry = stopped["interrupted"]
    assert entry["world_size"] == WORLD and len(entry["ranks"]) == WORLD and entry["epoch"] in (0, 1)
    assert _rank_logs(logs, "stdout")[1] == ""

    logs = tmp_path / "logs-resumed"
    process = _torchrun(save, logs, "--resume")
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-3000:]
    assert "continuing epoch" in _rank_logs(logs, "stdout")[0] and _rank_logs(logs, "stdout")[1] == ""
    ours = torch.load(save / "save_models" / "checkpoint_001.pth.tar", weights_only=True)
    theirs = torch.load(straight / "save_models" / "checkpoint_001.pth.tar", weights_only=True)
    assert all(torch.equal(ours["state_dict"][k], v) for k, v in theirs["state_dict"].items())
    assert (save / "scores.tsv").read_text() == (straight / "scores.tsv").read_text()
    assert not (save / "save_models" / "interrupted.pth.tar").exists()


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
