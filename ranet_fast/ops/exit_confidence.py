"""exit_confidence: how sure each exit is, and what it predicts.

For logits of shape [N, C] the op returns

* ``confidence[N]`` -- the largest softmax probability of each row,
  ``1 / sum_c exp(x_c - max_c x_c)``, in float32 (float64 for float64 logits);
* ``prediction[N]`` -- the argmax of each row (int64, lowest column on ties,
  like ``torch.argmax``).

This is the early-exit decision of RANet/MSDNet adaptive inference: a sample
leaves at the first exit whose confidence reaches that exit's threshold. It is
a decision, not a training signal, so the outputs never require grad (the
input is detached) and no backward is defined.

Non-finite logits follow ``torch.softmax``/``torch.argmax``: a NaN makes the
confidence NaN and the prediction the first NaN's column; a row whose maximum
is infinite gets a NaN confidence.
"""

from __future__ import annotations

import torch

from ._registry import FUNCTIONAL, Form, OpSpec, register, run, triton_kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _confidence_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def validate_logits(logits: object, op_name: str = "exit_confidence") -> None:
    """Raises TypeError/ValueError unless ``logits`` is a floating [N, C] tensor, C >= 1.

    ``op_name`` is the op the messages name (exit_partition validates the same way).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op_name} expects a torch.Tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(
            f"{op_name} expects logits of shape [N, C]; got a {logits.dim()}-D tensor "
            f"of shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 1:
        raise ValueError(
            f"{op_name} needs at least one class (C >= 1); got logits of shape {tuple(logits.shape)}"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op_name} supports float16, bfloat16, float32 and float64 logits; "
            f"got {logits.dtype}"
        )


def exit_confidence_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch exit_confidence: the definition the kernels are tested against.

    Computes the softmax in float32 (float64 for float64 logits). Runs on any
    device; also the fallback when no compiled or Triton kernel applies.
    """
    validate_logits(logits)
    probabilities = torch.softmax(logits.detach().to(_confidence_dtype(logits.dtype)), dim=1)
    # The argmax is taken on the logits: distinct logits can round to equal
    # probabilities, which would move the first-index tie-break.
    prediction = torch.argmax(logits.detach(), dim=1)
    confidence = probabilities.amax(dim=1)
    return confidence, prediction


def _fake_exit_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(logits.dim() == 2, lambda: f"expected [N, C] logits, got shape {tuple(logits.shape)}")
    torch._check(logits.shape[1] >= 1, lambda: "exit_confidence needs C >= 1")
    num_rows = logits.shape[0]
    confidence = logits.new_empty(num_rows, dtype=_confidence_dtype(logits.dtype))
    prediction = logits.new_empty(num_rows, dtype=torch.int64)
    return confidence, prediction


def _exit_confidence_triton(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_kernels(SPEC.triton_module).exit_confidence_triton(logits)


SPEC = OpSpec("exit_confidence", "exit_confidence", {
    FUNCTIONAL: Form(triton=_exit_confidence_triton, reference=exit_confidence_reference, fake=_fake_exit_confidence),
})
register(SPEC)


def exit_confidence(logits: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and argmax of each row of [N, C] logits.

    Args:
        logits: float16/bfloat16/float32/float64 tensor of shape [N, C], C >= 1,
            any strides. Its autograd history is ignored.
        backend: None (automatic, or the RANET_FAST_BACKEND environment variable),
            "cuda", "triton", "cpu" or "reference"; see ranet_fast._extension.

    Returns:
        (confidence, prediction): float32 (float64 for float64 logits) and int64
        tensors of shape [N] on the input's device.
    """
    validate_logits(logits)
    return run(SPEC, backend, logits.detach())
