"""``optimize(model, example_input)``: an inference-only model without per-call overhead.

What the returned :class:`OptimizedModel` does, once, when it is built:

* takes a deep copy of ``model`` (later changes to the original do not reach it: it is a snapshot),
  converts the copy's layers to the fast ones (:func:`ranet_fast.convert`), puts it in eval mode,
  switches off ``requires_grad`` and casts it to the example's device and dtype, and to
  channels_last when the example is channels_last or (by default) on a CPU, where it measured
  faster for RANet whatever the example's layout (inputs are converted on entry);
* folds every BatchNorm into its conv (the fast layers cache the folded scale and shift; nothing
  changes the weights afterwards, so it is never redone). With ``fold_weights`` (the default on
  every device) the BN is folded into the conv's weight and bias instead
  (:mod:`ranet_fast.nn.folded`), so each conv -> BN -> ReLU is one library convolution with a bias
  (oneDNN on a CPU, cuDNN on tensor cores on CUDA) and an in-place ReLU: no per-call BN work at
  all, and on CUDA the GEMM runs where eager's does instead of in the fused_conv2d kernels;
* runs the model once on the example, and on CUDA (``cuda_graphs=None`` or ``True`` with a CUDA
  example) captures the whole anytime forward for the example's shape in a CUDA graph.

On every call it checks the input against the example, runs under ``torch.inference_mode`` and:

* with CUDA graphs, copies the input into the graph's static input buffer, replays the graph and
  returns copies of the static per-exit logits. Another batch size gets its own graph, captured
  on first use; at most ``max_graphs`` whole-forward graphs are kept (least recently used goes);
* otherwise runs the prepared model's forward (this is the CPU path).

The staged interface of :func:`ranet_fast.inference.early_exit` (``num_exits``,
``early_exit_start``, ``early_exit_stage``) goes through the prepared model too. With CUDA graphs
the start and every stage are captured per batch-size bucket (the next power of two, so that the
engine's shrinking batches reuse a few graphs; at most one per stage and power of two): the live
rows are copied into the bucket's static buffers, the graph runs on the whole bucket (rows do not
interact in eval mode, so the padding rows cannot change the live ones) and the first rows of the
static outputs are returned. **Those staged results are views of the graph's buffers, valid until
the wrapper's next call**; the engine consumes each state before the next stage, which is what
the views are for (no copy-out of the large per-stage state). ``forward`` always returns fresh
tensors.

What it does not do: training, gradients (outputs are inference tensors), autocast, inputs of
another dtype, device, rank or per-sample shape than the example (a clear error), moving the
wrapper with ``.to()`` (build another one), graph capture on CPU, and one graph for the whole
early-exit loop (the engine still synchronises once per exit to learn how many samples go on).
All graphs of one wrapper share one CUDA memory pool; replays are serialised on the current stream.
The CUDA-graph path has been written without a GPU to run it on: its tests skip without one.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ranet_fast.nn import convert
from ranet_fast.nn.folded import fold
from ranet_fast.nn.dense import official_forward_active
from ranet_fast.ops.fused_conv2d import output_memory_format

# Warm-up runs before a capture: the first run initialises lazily created state (library
# handles, Triton compilations, the folded-BN caches), which a capture must not contain.
_WARMUP_RUNS = 2


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for 4-D tensors whose channels are innermost (also a channel slice of such a
    buffer, as RANet's block outputs are), else contiguous."""
    return output_memory_format(x) if x.dim() == 4 else torch.contiguous_format


def _static_like(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A zero tensor like ``t`` with ``rows`` rows, dense in t's memory format. Zeros, not
    uninitialised memory: rows beyond the live ones are computed too, and garbage there could hold
    NaNs or denormals that slow some kernels down."""
    # torch.zeros takes no memory_format (a TypeError first seen on an H200: the CPU path never
    # captures graphs); empty with one does.
    return torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=_memory_format(t)).zero_()


def _describe(shape, dtype, device) -> str:
    return f"[{', '.join(map(str, shape))}] {str(dtype).replace('torch.', '')} on {device}"


class _Graph:
    """One captured computation: static inputs shaped like ``inputs`` with ``rows`` rows, the graph,
    and its static outputs."""

    def __init__(self, fn, inputs, rows: int, pool):
        self.inputs = pytree.tree_map(lambda t: _static_like(t, rows), inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                fn(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(self.inputs)

    def run(self, inputs, rows: int):
        """Copy ``inputs`` into the first ``rows`` rows of the static inputs, replay, return the
        first ``rows`` rows of the static outputs (views)."""
        for static, value in zip(pytree.tree_leaves(self.inputs), pytree.tree_leaves(inputs)):
            static[:rows].copy_(value)
        self.graph.replay()
        return pytree.tree_map(lambda t: t[:rows], self.outputs)


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns; see the module docstring."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, *, cuda_graphs: bool, fold_weights: bool,
                 channels_last: bool, max_graphs: int):
        super().__init__()
        self.example_shape = tuple(example_input.shape)
        self.dtype = example_input.dtype
        self.device = example_input.device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        model = convert(copy.deepcopy(model)).eval().requires_grad_(False)
        model = model.to(device=self.device, dtype=self.dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # Which classes the layers became: convert's counts, or fold's (which undoes some of them).
        self.layers = fold(model) if fold_weights else dict(model.ranet_fast_converted)
        self.model = model
        # (kind, batch) -> _Graph, least recently used first.
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        with torch.inference_mode():
            example = example_input.contiguous(memory_format=self.memory_format)
            if cuda_graphs:
                self._graph(("forward", example.shape[0]), self.model, example, example.shape[0])
            else:
                self.model(example)  # folds and caches every BatchNorm
        super().train(False)

    # The wrapper is fixed to the example's device and dtype and to eval mode.

    def train(self, mode: bool = True) -> "OptimizedModel":
        if mode:
            raise RuntimeError("an optimize()d model is inference-only; train the original model instead")
        return super().train(False)

    def _apply(self, fn, recurse=True):
        if hasattr(self, "_graphs"):  # nn.Module.__init__ is done: a user's .to()/.cuda()/.half()
            raise RuntimeError("an optimize()d model is fixed to the example's device and dtype; "
                               "call ranet_fast.inference.optimize again with an example of the new kind")
        return super()._apply(fn, recurse)

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    @property
    def classifier(self):
        """The wrapped model's exits, where count_flops marks an exit by default."""
        return self.model.classifier

    @property
    def early_exit_modules(self):
        """The exits whose completion count_flops marks for early_exit (those of the wrapped model)."""
        return getattr(self.model, "early_exit_modules", None) or self.model.classifier

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the example's memory format, or an error saying how it differs from the example."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the optimize()d model expects a torch.Tensor, got {type(x).__name__}")
        expected = _describe(("N", *self.example_shape[1:]), self.dtype, self.device)
        if x.dtype != self.dtype or x.device != self.device or tuple(x.shape[1:]) != self.example_shape[1:] \
                or x.dim() != len(self.example_shape):
            raise ValueError(f"the optimize()d model was built for inputs {expected} (from its example input); "
                             f"got {_describe(x.shape, x.dtype, x.device)}. Build another one with "
                             "ranet_fast.inference.optimize for other inputs")
        return x.contiguous(memory_format=self.memory_format)

    def _graph(self, key: tuple, fn, inputs, rows: int) -> _Graph:
        graph = self._graphs.get(key)
        if graph is None:
            graph = _Graph(fn, inputs, rows, self._pool)
            self._graphs[key] = graph
        self._graphs.move_to_end(key)
        return graph

    def _evict(self, kind: str, limit: int) -> None:
        keys = [key for key in self._graphs if key[0] == kind]
        for key in keys[: max(0, len(keys) - limit)]:
            del self._graphs[key]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if official_forward_active():  # count_flops: every layer's hooks must see its work
            return self.model(x)
        x = self.check_input(x)
        with torch.inference_mode():
            if not self.cuda_graphs or x.shape[0] == 0:
                return self.model(x)
            graph = self._graph(("forward", x.shape[0]), self.model, x, x.shape[0])
            self._evict("forward", self.max_graphs)
            return [logits.clone() for logits in graph.run(x, x.shape[0])]

    def _bucket(self, rows: int) -> int:
        return 1 << max(0, rows - 1).bit_length()

    def early_exit_start(self, x: torch.Tensor):
        x = self.check_input(x)
        with torch.inference_mode():
            if not self.cuda_graphs or x.shape[0] == 0:
                return self.model.early_exit_start(x)
            bucket = self._bucket(x.shape[0])
            graph = self._graph(("start", bucket), self.model.early_exit_start, x, bucket)
            return graph.run(x, x.shape[0])

    def early_exit_stage(self, exit_index: int, state):
        with torch.inference_mode():
            leaves = pytree.tree_leaves(state)
            rows = leaves[0].shape[0] if leaves else 0
            if not self.cuda_graphs or rows == 0:
                return self.model.early_exit_stage(exit_index, state)
            if not 0 <= exit_index < self.num_exits:  # before a capture, not inside it
                raise IndexError(f"the model has {self.num_exits} exits; exit_index {exit_index} is out of range")
            bucket = self._bucket(rows)
            # The per-sample shapes are in the key in case a model's state differs between calls.
            key = ("stage", exit_index, bucket, tuple((tuple(t.shape[1:]), t.dtype) for t in leaves))
            graph = self._graph(key, lambda inputs: self.model.early_exit_stage(exit_index, inputs), state, bucket)
            return graph.run(state, rows)


def optimize(model: nn.Module, example_input: torch.Tensor, *, cuda_graphs: bool | None = None,
             fold_weights: bool = True, channels_last: bool | None = None,
             max_graphs: int = 8) -> OptimizedModel:
    """An inference-only, BN-folded, fast-layer copy of ``model`` for inputs like ``example_input``.

    Args:
        model: a RANet (or another staged multi-exit model; see ranet_fast.inference.early_exit).
            It is copied, not changed.
        example_input: a batch of the inputs to come. Its dtype, device, rank and per-sample shape
            are fixed for the returned model (other ones are errors). Its batch size is the one
            captured up front; other batch sizes work too.
        cuda_graphs: capture CUDA graphs (default: when the example is on a CUDA device).
        fold_weights: fold each BN into its conv's weight and bias (default: yes, on every device;
            ``False`` keeps the fused_conv2d layers, which apply the folded BN in their epilogue).
        channels_last: run the model in channels_last (default: when the example is channels_last,
            and always on a CPU). Inputs are converted to it on entry.
        max_graphs: whole-forward graphs kept, one per batch size seen (least recently used goes).

    Returns:
        :class:`OptimizedModel`: ``model(x)`` gives the per-exit logits like the original's eval
        forward; ``ranet_fast.inference.early_exit(optimized, x, thresholds)`` works on it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"optimize expects example_input as a torch.Tensor, got {type(example_input).__name__}")
    if not example_input.is_floating_point() or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("optimize expects a floating-point example_input with a batch dimension of at least one "
                         f"sample; got {_describe(example_input.shape, example_input.dtype, example_input.device)}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}")
    on_cuda = example_input.device.type == "cuda"
    if cuda_graphs is None:
        cuda_graphs = on_cuda
    elif cuda_graphs and not on_cuda:
        raise ValueError(f"cuda_graphs=True needs a CUDA example_input; it is on {example_input.device}")
    on_cpu = example_input.device.type == "cpu"
    if channels_last is None:
        channels_last = example_input.dim() == 4 and (on_cpu or _memory_format(example_input) == torch.channels_last)
    if channels_last and example_input.dim() != 4:
        raise ValueError(f"channels_last needs 4-D inputs; the example has shape {tuple(example_input.shape)}")
    return OptimizedModel(model, example_input, cuda_graphs=bool(cuda_graphs), fold_weights=bool(fold_weights),
                          channels_last=bool(channels_last), max_graphs=max_graphs)
