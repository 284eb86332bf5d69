"""``--cuda-graph`` (ranet_fast/train/cuda_graph.py): the captured training step against the uncaptured one.

On a GPU: a converted RANet trained for several steps through ``GraphedTrainStep`` (warm-up,
capture, replays, a learning-rate change that captures again, an odd-sized batch that runs
uncaptured) gives the losses, BN running statistics and weights of the same steps run uncaptured,
in float32 and under bfloat16 autocast. Without a GPU those tests skip; the refusals are checked
everywhere: on a CPU the trainer stops with a one-line error before it builds anything.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

import ranet_fast.train.__main__ as trainer
from ranet_fast.models import RANet, ranet_config
from ranet_fast.nn import convert
from ranet_fast.train import cuda_graph
from ranet_fast.train.loop import train_step
from cuda_testing import NO_CUDA_GPU, deterministic_algorithms
from model_testing import randomize_bn

TINY = ["--data", "synthetic", "--synthetic-size", "32,16,16", "-b", "16", "-j", "0", "--nChannels", "4",
        "--growthRate", "4", "--step", "1", "--nBlocks", "1", "--block-step", "1"]


def test_cuda_graph_on_cpu_exits_2_before_training(tmp_path, capsys):
    save = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        trainer.main(TINY + ["--device", "cpu", "--cuda-graph", "--save", str(save)])
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ranet-train: error:") and "\n" not in error
    assert "--cuda-graph" in error and "needs a CUDA device" in error and "cpu" in error
    assert not save.exists()  # refused before any file of the run was written


@pytest.mark.parametrize("flags, refusal", [
    (dict(amp="fp16"), "--amp fp16"),
    (dict(optimizer="adam"), "--optimizer sgd only"),
    (dict(lr_type="cosine"), "--lr-type multistep"),
])
def test_cuda_graph_refuses_what_a_graph_cannot_hold(flags, refusal):
    args = argparse.Namespace(**{**dict(amp="bf16", optimizer="sgd", lr_type="multistep"), **flags})
    found = cuda_graph.problems(args, torch.device("cuda", 0), distributed=False)
    assert len(found) == 1 and refusal in found[0]
    assert any("torchrun" in p for p in cuda_graph.problems(args, torch.device("cuda", 0), distributed=True))
    default = argparse.Namespace(amp="none", optimizer="sgd", lr_type="multistep")
    assert cuda_graph.problems(default, torch.device("cuda", 0), distributed=False) == []


def _batches(device, sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (n,), generator=generator).to(device)) for n in sizes]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_graphed_steps_equal_uncaptured_steps(amp):
    torch.manual_seed(4)
    model = RANet(ranet_config("cifar-c1", nChannels=8, growthRate=4, step=2))
    randomize_bn(model)
    model = convert(model).cuda().to(memory_format=torch.channels_last).train()
    plain, graphed_model = model, copy.deepcopy(model)
    device = torch.device("cuda")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
                  for m in (plain, graphed_model)]
    criterion = nn.CrossEntropyLoss()
    steps = [lambda images, target, m=m, o=o: train_step(m, images, target, optimizer=o, criterion=criterion,
                                                         device=device, amp=amp, cache_casts=cache)
             for m, o, cache in ((plain, optimizers[0], True), (graphed_model, optimizers[1], False))]
    graphed = cuda_graph.GraphedTrainStep(graphed_model, optimizers[1], steps[1])
    # 3 warm-up steps, capture + 2 replays, an odd batch (uncaptured), a replay, a new learning
    # rate (captured again) and 2 replays.
    sizes = [8] * 6 + [5] + [8] * 3
    learning_rates = [0.05] * 7 + [0.005] * 3
    with deterministic_algorithms():
        for index, ((images, target), lr) in enumerate(zip(_batches(device, sizes), learning_rates)):
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            _, plain_loss = steps[0](images, target)
            _, graphed_loss = graphed(images, target)
            torch.testing.assert_close(graphed_loss, plain_loss, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"step {index}: {m}")
        graphed.settle()
    assert graphed.captures == 2
    for (name, a), b in zip(graphed_model.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(graphed_model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # After settle() the eval-mode caches see the trained weights: eval outputs agree too.
    plain.eval(), graphed_model.eval()
    with torch.no_grad():
        for a, b in zip(graphed_model(images), plain(images), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
def test_trainer_runs_with_cuda_graph(tmp_path):
    save = tmp_path / "graphed"
    trainer.main(TINY + ["--device", "cuda", "--cuda-graph", "--amp", "bf16", "--epochs", "2",
                         "--early-exit-images", "0", "--save", str(save)])
    assert (save / "save_models" / "checkpoint_001.pth.tar").exists()
