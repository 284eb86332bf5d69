"""``--cuda-graph``: the training step (forward, loss, backward, optimizer step) as one CUDA graph.

A RANet training step launches thousands of small kernels; replaying them from one captured graph
costs one launch. How: the first ``WARMUP_STEPS`` steps run uncaptured on a side stream (they
create the optimizer's momentum buffers, the cuDNN/Triton choices and the fast layers' cached
weights, none of which may happen inside a capture). The next full-size batch is copied into
static input and target buffers and the whole step is captured, then replayed, for it and for
every later batch of that shape. The step captured is exactly :func:`ranet_fast.train.loop.train_step`,
the uncaptured step, so the losses and the BN running statistics are the same.

What the graph fixes, and how the trainer deals with it:

* shapes: a batch of another size (the last, smaller batch of an epoch) runs uncaptured;
* the learning rate is baked into the captured optimizer step as a number, so a step with another
  learning rate captures again. The multistep schedule changes it at two epochs of a run; the
  cosine schedule changes it every step and is refused (``problems``);
* state outside the device: a GradScaler (``--amp fp16``) decides on the host whether to skip a
  step, and Adam and RMSprop count steps in a CPU tensor, so they are refused, as are
  DistributedDataParallel (its gradient hooks) and CPU devices (no CUDA graphs);
* version counters: a replay changes the weights and the BN buffers without bumping their
  ``_version``, which the fast layers' caches (the folded BN of eval mode, the low-precision
  weights) key on. Before any uncaptured code reads them after replays (an uncaptured step,
  validation) :meth:`GraphedTrainStep.settle` bumps every parameter's and buffer's version with
  an in-place multiplication by one.

Written without a GPU to run it on: tests/test_cuda_graph_step.py checks it on one (losses and
running statistics against the uncaptured step) and skips without one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

WARMUP_STEPS = 3


def problems(args, device: torch.device, distributed: bool) -> list[str]:
    """Why ``--cuda-graph`` cannot run with these flags on this device (empty: it can)."""
    found = []
    if device.type != "cuda":
        found.append(f"--cuda-graph captures CUDA graphs and needs a CUDA device; this run is on {device}")
    if distributed:
        found.append("--cuda-graph does not support torchrun/DistributedDataParallel")
    if args.amp == "fp16":
        found.append("--cuda-graph does not support --amp fp16 (its GradScaler decides on the host; use --amp bf16)")
    if args.optimizer != "sgd":
        found.append(f"--cuda-graph supports --optimizer sgd only ({args.optimizer} keeps its step count on the host)")
    if args.lr_type != "multistep":
        found.append("--cuda-graph needs --lr-type multistep (the cosine schedule changes the learning rate every "
                     "step, and each change means a new capture)")
    return found


class GraphedTrainStep:
    """Runs ``step(images, target) -> (outputs, loss)`` captured in a CUDA graph where it can.

    ``step`` must do the whole training step (it is :func:`ranet_fast.train.loop.train_step` bound
    to the model, optimizer and criterion); it is called uncaptured for the warm-up and for odd
    batch sizes, and once under capture.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 step: Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]):
        self.model, self.optimizer, self.step = model, optimizer, step
        self.warmups_left = WARMUP_STEPS
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_lrs: tuple | None = None
        self.static_images = self.static_target = None
        self.static_outputs: list[torch.Tensor] = []
        self.static_loss: torch.Tensor | None = None
        self.replayed = False
        self.captures = 0

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.warmups_left > 0:
            self.warmups_left -= 1
            return self._on_side_stream(images, target)
        if self.static_images is not None and (images.shape != self.static_images.shape
                                               or target.shape != self.static_target.shape):
            self.settle()
            return self.step(images, target)
        lrs = tuple(group["lr"] for group in self.optimizer.param_groups)
        if self.graph is None or lrs != self.captured_lrs:
            self.settle()
            self._capture(images, target, lrs)
        self.static_images.copy_(images)
        self.static_target.copy_(target)
        self.graph.replay()
        self.replayed = True
        return self.static_outputs, self.static_loss

    def settle(self) -> None:
        """Makes the replays' changes visible to version-keyed caches (call before uncaptured code
        reads the model: the trainer does at the end of every epoch)."""
        if not self.replayed:
            return
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                tensor.mul_(1)
        self.replayed = False

    def _on_side_stream(self, images, target):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.step(images, target)
        torch.cuda.current_stream().wait_stream(side)
        return result

    def _capture(self, images, target, lrs) -> None:
        # Drop the previous graph (another learning rate) first: its memory goes back to the pool.
        self.graph = self.static_outputs = self.static_loss = None
        self.static_images, self.static_target = images.clone(), target.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs, self.static_loss = self.step(self.static_images, self.static_target)
        self.captured_lrs = lrs
        self.captures += 1
