"""Triton kernels of upsample_concat (kernels/upsample_concat.py) against a float64 reference.

The reference is written here from F.interpolate(mode='bilinear',
align_corners=True) plus slice writes, and autograd through it for the
gradients. Every case writes into a NaN-poisoned buffer (sometimes a channel
slice or a strided view of a bigger one) and checks that the whole buffer ends
up as the reference's slices with every other element still NaN.

On CPU the kernels run under the Triton interpreter in a subprocess: Triton
fixes interpreter mode when a kernel module is imported, so setting
TRITON_INTERPRET=1 here would depend on import order and switch every other
test's kernels too. The subprocess imports this module and runs the same
checks as the GPU tests run in process.
"""

import dataclasses
import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import each_check_on_gpu, each_check_under_interpreter

# Against the float64 reference. float32: the kernel's float32 scale
# (in-1)/(out-1) and float32 arithmetic differ from float64's by a few ulps of
# the source position, times the input's slope (inputs are standard normal).
# Half types: one rounding of the result (bfloat16 keeps 8 bits).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def kernels_module():
    """Imported on first use so that importing this file does not fix Triton's mode."""
    return importlib.import_module("ranet_fast.kernels.upsample_concat")


@dataclasses.dataclass(frozen=True)
class Case:
    """One call: parts of (channels, height, width) written into an (height, width) output.

    Channel offsets default to consecutive slices starting at channel 1 of an
    output with one spare channel on either side, so every case checks that
    channels outside the slices stay untouched.
    """

    part_sizes: tuple
    out_size: tuple
    batch: int = 2
    dtype: torch.dtype = torch.float32
    part_layout: str = "nchw"  # nchw | channels_last | strided
    out_layout: str = "nchw"  # nchw | channels_last | slice | strided
    offsets: tuple = None
    out_channels: int = None

    def channel_offsets(self):
        if self.offsets is not None:
            return list(self.offsets)
        offsets, next_channel = [], 1
        for channels, _, _ in self.part_sizes:
            offsets.append(next_channel)
            next_channel += channels
        return offsets

    def total_channels(self):
        if self.out_channels is not None:
            return self.out_channels
        return max(offset + size[0] for offset, size in zip(self.channel_offsets(), self.part_sizes)) + 1


CASES = {
    # RANet's CIFAR sizes: fusion up to 32 and 16, and down to 8.
    "cifar-up-to-32": Case(((2, 16, 16), (2, 8, 8), (1, 32, 32)), (32, 32), batch=1),
    "cifar-up-to-16": Case(((2, 8, 8), (2, 16, 16)), (16, 16)),
    "cifar-down-to-8": Case(((2, 32, 32), (1, 16, 16), (1, 8, 8)), (8, 8), batch=1),
    # RANet's ImageNet sizes, up and down in one call.
    "imagenet-to-28": Case(((1, 56, 56), (2, 14, 14), (2, 7, 7), (1, 28, 28)), (28, 28), batch=1),
    "imagenet-to-14": Case(((1, 28, 28), (1, 7, 7), (1, 56, 56)), (14, 14), batch=1),
    "imagenet-up-to-56": Case(((1, 28, 28), (1, 7, 7)), (56, 56), batch=1),
    # Odd sizes and non-integer factors.
    "5-to-13": Case(((3, 5, 5),), (13, 13)),
    "13-to-5": Case(((3, 13, 13),), (5, 5)),
    "1-to-7": Case(((2, 1, 1), (1, 1, 7)), (7, 7)),
    "7-to-1": Case(((2, 7, 7), (1, 7, 1)), (1, 1)),
    "3x9-to-8x4": Case(((3, 3, 9),), (8, 4)),
    "5x13-to-13x5": Case(((2, 5, 13), (1, 13, 5)), (13, 5)),
    "2-to-15": Case(((2, 2, 2),), (15, 15)),
    # Identity parts only: a plain copy.
    "identity": Case(((3, 6, 5), (2, 6, 5)), (6, 5)),
    # More parts than one launch takes, with gaps and out-of-order offsets.
    "six-parts-chunked": Case(
        ((1, 4, 4), (2, 8, 8), (1, 3, 5), (1, 8, 8), (2, 12, 12), (1, 1, 1)),
        (8, 8),
        offsets=(9, 0, 3, 5, 12, 15),
        out_channels=17,
    ),
    # Layouts of the parts and of the output (and of the output gradient).
    "channels-last-parts": Case(((3, 4, 4), (3, 8, 8)), (8, 8), part_layout="channels_last"),
    "channels-last-out": Case(((3, 4, 4), (3, 8, 8)), (8, 8), out_layout="channels_last"),
    "channels-last-both": Case(
        ((3, 5, 5), (2, 8, 8)), (8, 8), part_layout="channels_last", out_layout="channels_last"
    ),
    "strided-parts": Case(((3, 5, 6), (2, 9, 9)), (9, 9), part_layout="strided"),
    "strided-out": Case(((3, 5, 6), (2, 9, 9)), (9, 9), out_layout="strided"),
    "channel-slice-out": Case(((3, 4, 4), (2, 8, 8)), (8, 8), out_layout="slice"),
    "channel-slice-out-channels-last-parts": Case(
        ((3, 4, 4), (2, 8, 8)), (8, 8), out_layout="slice", part_layout="channels_last"
    ),
    # Batch sizes.
    "batch-1": Case(((2, 3, 3), (1, 6, 6)), (6, 6), batch=1),
    "batch-0": Case(((2, 3, 3), (1, 6, 6)), (6, 6), batch=0),
    # Other dtypes.
    "float16": Case(((2, 4, 4), (2, 7, 7), (1, 8, 8)), (8, 8), dtype=torch.float16),
    "bfloat16": Case(((2, 4, 4), (2, 7, 7), (1, 8, 8)), (8, 8), dtype=torch.bfloat16),
    "bfloat16-channels-last": Case(
        ((2, 13, 13), (2, 5, 5)), (5, 5), dtype=torch.bfloat16, part_layout="channels_last", out_layout="slice"
    ),
    "float16-odd": Case(((2, 3, 9), (1, 1, 1)), (8, 4), dtype=torch.float16, out_layout="strided"),
    "float64": Case(((2, 5, 5), (2, 13, 13), (1, 9, 9)), (9, 9), dtype=torch.float64),
    "float64-odd": Case(((2, 1, 7), (2, 7, 1)), (5, 3), dtype=torch.float64, part_layout="strided"),
}


def _generator(name, salt):
    return torch.Generator().manual_seed(zlib.crc32(f"{name}/{salt}".encode()))


def make_part(name, index, case, device):
    channels, height, width = case.part_sizes[index]
    generator = _generator(name, f"part{index}")
    shape = (case.batch, channels, height, width)
    if case.part_layout == "strided":
        # Every other row and all but the first column of a bigger tensor.
        base = torch.randn((case.batch, channels, 2 * height, width + 1), generator=generator, dtype=torch.float64)
        return base.to(case.dtype).to(device)[:, :, ::2, 1:]
    values = torch.randn(shape, generator=generator, dtype=torch.float64).to(case.dtype).to(device)
    if case.part_layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    assert case.part_layout == "nchw"
    return values


def make_buffer(case, fill, device):
    """(base, view): the tensor the kernel writes is view, a view of base laid out as case.out_layout."""
    height, width = case.out_size
    channels = case.total_channels()
    shape = (case.batch, channels, height, width)
    if case.out_layout == "nchw":
        base = fill((case.batch, channels, height, width))
        return base, base
    if case.out_layout == "channels_last":
        base = fill((case.batch, height, width, channels))
        return base, base.permute(0, 3, 1, 2)
    if case.out_layout == "slice":
        # Channels [2, 2 + channels) of a channels_last buffer with 5 more channels.
        base = fill((case.batch, height, width, channels + 5))
        return base, base.permute(0, 3, 1, 2)[:, 2 : 2 + channels]
    assert case.out_layout == "strided"
    # Batch innermost, and every other column of a wider buffer.
    base = fill((channels, height, 2 * width, case.batch))
    view = base.permute(3, 0, 1, 2)[:, :, :, ::2]
    assert view.shape == shape
    return base, view


def resize_reference(part, size):
    """F.interpolate(bilinear, align_corners=True), or the part itself when the size already matches."""
    if tuple(part.shape[2:]) == tuple(size):
        return part
    return F.interpolate(part, size=size, mode="bilinear", align_corners=True)


def check_forward(name, device):
    case = CASES[name]
    kernels = kernels_module()
    parts = [make_part(name, index, case, device) for index in range(len(case.part_sizes))]
    offsets = case.channel_offsets()
    poison = lambda shape: torch.full(shape, float("nan"), dtype=case.dtype, device=device)
    base, out = make_buffer(case, poison, device)
    kernels.upsample_concat_forward_triton(out, parts, offsets)

    expected_base, expected = make_buffer(case, lambda shape: torch.full(shape, float("nan"), dtype=torch.float64), "cpu")
    for part, offset in zip(parts, offsets):
        expected[:, offset : offset + part.shape[1]] = resize_reference(part.cpu().double(), case.out_size)
    # Slices equal the reference, every other element of the buffer is still NaN.
    torch.testing.assert_close(base.cpu().double(), expected_base, equal_nan=True, **TOLERANCES[case.dtype])
    for part, offset in zip(parts, offsets):
        if tuple(part.shape[2:]) == tuple(case.out_size):
            assert torch.equal(out[:, offset : offset + part.shape[1]], part), "identity part is not an exact copy"


def check_backward(name, device):
    case = CASES[name]
    kernels = kernels_module()
    parts = [make_part(name, index, case, "cpu").double().requires_grad_() for index in range(len(case.part_sizes))]
    offsets = case.channel_offsets()
    generator = _generator(name, "grad")
    random = lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64).to(case.dtype).to(device)
    _, grad_output = make_buffer(case, random, device)

    # Autograd through the reference: only the parts' slices of the output gradient count.
    reference_output = torch.cat(
        [resize_reference(part, case.out_size) for part in parts], dim=1
    )
    reference_grad = torch.cat(
        [grad_output.cpu().double()[:, offset : offset + part.shape[1]] for part, offset in zip(parts, offsets)], dim=1
    )
    reference_output.backward(reference_grad)

    part_shapes = [tuple(part.shape[1:]) for part in parts]
    grads = kernels.upsample_concat_backward_triton(grad_output, offsets, part_shapes)
    assert len(grads) == len(parts)
    memory_format = kernels.gradient_memory_format(grad_output)
    for grad, part, offset in zip(grads, parts, offsets):
        assert grad.shape == part.shape and grad.dtype == case.dtype and grad.device == grad_output.device
        assert grad.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(grad.cpu().double(), part.grad, **TOLERANCES[case.dtype])
        if tuple(part.shape[2:]) == tuple(case.out_size):
            assert torch.equal(grad, grad_output[:, offset : offset + part.shape[1]]), "identity gradient is not a copy"
    # Gather form: the same inputs give bitwise the same gradients.
    again = kernels.upsample_concat_backward_triton(grad_output, offsets, part_shapes)
    assert all(torch.equal(first, second) for first, second in zip(grads, again))


def check_matches_torch_float32_arithmetic(device):
    """Same index and weight arithmetic as torch's own float32 kernel, not only close to float64."""
    kernels = kernels_module()
    generator = torch.Generator().manual_seed(5)
    for in_size, out_size in [((5, 13), (13, 5)), ((7, 7), (16, 16)), ((16, 16), (7, 7)), ((3, 9), (8, 4))]:
        part = torch.randn((2, 3, *in_size), generator=generator)
        out = torch.empty((2, 3, *out_size), device=device)
        kernels.upsample_concat_forward_triton(out, [part.to(device)], [0])
        expected = F.interpolate(part, size=out_size, mode="bilinear", align_corners=True)
        # A few ulps: only the compiler's choice of fused multiply-adds may differ.
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)


def check_batch_zero_launches_nothing(device):
    kernels = kernels_module()
    launched = []

    class Refusing:
        def __getitem__(self, grid):
            launched.append(grid)
            raise AssertionError("kernel launched for N == 0")

    saved = kernels._upsample_concat_forward_kernel, kernels._upsample_concat_backward_kernel
    kernels._upsample_concat_forward_kernel = kernels._upsample_concat_backward_kernel = Refusing()
    try:
        out = torch.empty((0, 5, 6, 6), device=device)
        kernels.upsample_concat_forward_triton(out, [torch.empty((0, 2, 3, 3), device=device)], [1])
        grads = kernels.upsample_concat_backward_triton(out, [1, 3], [(2, 3, 3), (1, 6, 6)])
    finally:
        kernels._upsample_concat_forward_kernel, kernels._upsample_concat_backward_kernel = saved
    assert not launched
    assert [tuple(grad.shape) for grad in grads] == [(0, 2, 3, 3), (0, 1, 6, 6)]


def check_bad_slices_are_refused(device):
    kernels = kernels_module()
    out = torch.empty((1, 4, 5, 5), device=device)
    part = torch.zeros((1, 3, 2, 2), device=device)
    for offsets, message in [([2], r"channels \[2, 5\) outside the 4 channels"), ([0, 1], "1 parts but 2")]:
        with pytest.raises(ValueError, match=message):
            kernels.upsample_concat_forward_triton(out, [part], offsets)
    with pytest.raises(ValueError, match=r"channels \[-1, 2\)"):
        kernels.upsample_concat_backward_triton(out, [-1], [(3, 2, 2)])
    with pytest.raises(ValueError, match="channels, height, width"):
        kernels.upsample_concat_backward_triton(out, [0], [(3, 0, 2)])


def check_64_bit_indexing(device):
    """The int64 index path (taken only for tensors of 2**31 elements or more) on small cases."""
    import triton.language as tl

    kernels = kernels_module()
    saved = kernels._index_dtype
    kernels._index_dtype = lambda tensors, largest_index_range: tl.int64
    try:
        for name in ["six-parts-chunked", "channel-slice-out-channels-last-parts", "float16-odd"]:
            check_forward(name, device)
            check_backward(name, device)
    finally:
        kernels._index_dtype = saved


def check_index_dtype_choice(device):
    import triton.language as tl

    kernels = kernels_module()
    small = torch.empty((2, 3, 4, 5), device=device)
    assert kernels._index_dtype([small], small.numel()) == tl.int32
    # A view whose elements span more than 2**31 of memory, though it holds only 6.
    huge_span = torch.empty((3, 1, 1, 1), device="meta").as_strided((3, 2, 1, 1), (2**30, 1, 1, 1))
    assert kernels._index_dtype([small, huge_span], small.numel()) == tl.int64
    assert kernels._index_dtype([small], 2**31) == tl.int64


SPECIAL_CHECKS = {
    "64-bit-indexing": check_64_bit_indexing,
    "index-dtype-choice": check_index_dtype_choice,
    "torch-float32-arithmetic": check_matches_torch_float32_arithmetic,
    "batch-0-launches-nothing": check_batch_zero_launches_nothing,
    "bad-slices-refused": check_bad_slices_are_refused,
}


def all_checks():
    """name -> callable(device): every forward and backward case plus the special checks."""
    checks = {}
    for name in CASES:
        checks[f"forward/{name}"] = lambda device, name=name: check_forward(name, device)
        checks[f"backward/{name}"] = lambda device, name=name: check_backward(name, device)
    checks.update(SPECIAL_CHECKS)
    return checks


def triton_interpreter_checks():
    return all_checks()


# ---------------------------------------------------------------------------
# CPU tensors under the Triton interpreter (one subprocess for every check, conftest.py's
# triton_interpreter_report).
# ---------------------------------------------------------------------------


def test_interpreter_was_used(triton_interpreter_report):
    assert triton_interpreter_report["interpreted"]


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)


# ---------------------------------------------------------------------------
# The same checks on the GPU, in process.
# ---------------------------------------------------------------------------


test_gpu = each_check_on_gpu(triton_interpreter_checks)
