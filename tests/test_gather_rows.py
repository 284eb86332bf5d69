"""gather_rows: every backend against per-tensor index_select, bit for bit.

The op is a copy, so every comparison is bitwise (floats include NaNs with
payloads, infinities and -0.0). Inputs mix dtypes and layouts: contiguous,
channels_last, channel slices, transposed and strided views, expanded
(overlapping) batch and inner dims, misaligned row slices (which force the
kernels' narrower copy units), rows longer than one work item, zero-size rows.

The cpu and reference backends (and cuda on a GPU) run in process. The Triton
backend runs the same checks on CPU tensors under the Triton interpreter in a
subprocess (Triton fixes interpreter mode when a kernel module is imported);
tests/test_triton_sm90_compile.py compiles the kernel for sm_90.
"""

import functools
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranet_fast import _extension
from ranet_fast.ops import gather_rows, gather_rows_reference
from ranet_fast.ops.gather_rows import output_strides
from cuda_testing import NO_CUDA_GPU, deterministic_on
from op_testing import HAS_GPU, backends, compile_recording_ops, needs_extension
from triton_interpreter import each_check_under_interpreter


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------


def random_values(shape, dtype, generator, specials=True):
    """Random, never all-zero values; floats carry NaN (with a payload), +-inf and -0.0 too if `specials`."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(dtype)
    values = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    flat = values.view(-1)
    if specials and flat.numel() >= 4:
        flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
        if dtype == torch.float32:
            # A NaN with a non-default payload: only a byte copy keeps it.
            flat[:1].view(torch.int32)[0] = 0x7FC12345
    return values


def make_tensor(batch, shape, dtype, layout, generator, device="cpu", specials=True):
    """A [batch, *shape] tensor of random values (see random_values) laid out as `layout`."""
    full = (batch, *shape)
    values = lambda shape: random_values(shape, dtype, generator, specials)
    if layout == "contiguous":
        tensor = values(full)
    elif layout == "channels_last":
        tensor = values(full).contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":  # channels 1.. of a tensor with 2 more channels
        tensor = values((batch, shape[0] + 2, *shape[1:]))[:, 1 : 1 + shape[0]]
    elif layout == "channels_last_slice":
        base = values((batch, *shape[1:], shape[0] + 3))
        tensor = base.permute(0, 3, 1, 2)[:, 2 : 2 + shape[0]]
    elif layout == "transposed":  # the last two dims swapped: dense rows in another dim order
        tensor = values((batch, *shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "strided":  # every other element of the last dim
        tensor = values((*full[:-1], 2 * full[-1]))[..., ::2]
    elif layout == "batch_innermost":  # samples interleaved element by element
        tensor = values((*shape, batch)).movedim(-1, 0)
    elif layout == "expand_batch":  # every sample is the same memory (batch stride 0)
        tensor = values((1, *shape)).expand(full)
    elif layout == "expand_inner":  # dim 1 broadcast (stride 0 inside a row)
        tensor = values((batch, 1, *shape[1:])).expand(full)
    elif layout == "row_offset":  # rows start one element into a wider row: misaligned copy units
        tensor = values((batch, *shape[:-1], shape[-1] + 1))[..., 1:]
    else:
        raise AssertionError(layout)
    assert tensor.shape == full
    return tensor.to(device)


# (shape of a row, dtype, layout): the live tensors of a compaction step, and then some.
MIXED = [
    ((16, 8, 8), torch.float32, "contiguous"),
    ((16, 8, 8), torch.float32, "channels_last"),
    ((3, 40, 40), torch.float32, "contiguous"),  # 1200 16-byte units: two work items per row
    ((4, 64, 16), torch.float32, "contiguous"),  # exactly one work item (1024 16-byte units) per row
    ((6, 4, 4), torch.bfloat16, "channels_last"),
    ((5, 3, 3), torch.float16, "contiguous"),
    ((4, 5, 6), torch.float64, "channels_last"),
    ((), torch.int64, "contiguous"),  # the positions vector
    ((10,), torch.float32, "contiguous"),
    ((7,), torch.bool, "contiguous"),
    ((3, 5), torch.int64, "contiguous"),
    ((4, 6, 6), torch.float32, "channel_slice"),
    ((4, 6, 6), torch.bfloat16, "channels_last_slice"),
    ((3, 4, 5), torch.float16, "transposed"),
    ((3, 4, 5), torch.float32, "strided"),
    ((2, 3, 3), torch.float64, "batch_innermost"),
    ((3, 4, 4), torch.float32, "expand_batch"),
    ((3, 4, 4), torch.int64, "expand_inner"),
    ((1025,), torch.uint8, "row_offset"),  # 1-byte units, rows of more than one item
    ((2, 9), torch.float16, "row_offset"),  # 2-byte units
    ((1, 7), torch.bool, "row_offset"),
    ((3, 0, 4), torch.float32, "contiguous"),  # empty rows
    ((1, 1, 1), torch.int8, "contiguous"),
    ((1, 5, 5), torch.float32, "channel_slice"),  # a one-channel slice: row-dense after all
]


def mixed_tensors(batch, seed, device="cpu", specs=MIXED):
    generator = torch.Generator().manual_seed(seed)
    return [make_tensor(batch, shape, dtype, layout, generator, device) for shape, dtype, layout in specs]


def index_cases(rows, seed):
    """name -> index for `rows` input rows: empty, all, reversed, repeated (longer than rows), random subset."""
    generator = torch.Generator().manual_seed(seed)
    cases = {"empty": torch.empty(0, dtype=torch.int64)}
    if rows > 0:
        cases["all"] = torch.arange(rows)
        cases["reversed"] = torch.arange(rows - 1, -1, -1)
        cases["repeated"] = torch.randint(0, rows, (2 * rows + 3,), generator=generator)
        cases["subset"] = torch.randperm(rows, generator=generator)[: max(1, rows // 2)]
        cases["first-only"] = torch.zeros(3, dtype=torch.int64)
    return cases


def assert_bitwise_equal(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    as_bytes = lambda tensor: tensor.cpu().reshape(-1).contiguous().view(torch.uint8)
    assert torch.equal(as_bytes(actual), as_bytes(expected))


def expected_rows(tensors, index):
    return [tensor.cpu().index_select(0, index.cpu()) for tensor in tensors]


def assert_layout(out, tensor, rows):
    assert out.stride() == output_strides((rows, *tensor.shape[1:]), tensor.stride())
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    if tensor.is_contiguous():
        assert out.is_contiguous()


def assert_no_alias(outputs, tensors):
    for out in outputs:
        if out.numel() == 0:
            continue
        start, end = out.data_ptr(), out.data_ptr() + out.untyped_storage().nbytes()
        for tensor in tensors:
            storage = tensor.untyped_storage()
            assert end <= storage.data_ptr() or start >= storage.data_ptr() + storage.nbytes()


# ---------------------------------------------------------------------------
# Checks shared by the in-process backends and the Triton subprocess.
# ---------------------------------------------------------------------------


def check_mixed(backend, device, batch, index_name):
    tensors = mixed_tensors(batch, seed=zlib.crc32(f"{batch}/{index_name}".encode()), device=device)
    index = index_cases(batch, seed=batch)[index_name]
    originals = [tensor.clone() for tensor in tensors]
    expected = expected_rows(tensors, index)
    # Best effort against a kernel that leaves bytes unwritten: freed poison
    # of the outputs' sizes makes recycled memory poison rather than stale results.
    poison = [torch.full((e.numel() * e.element_size(),), 0xA5, dtype=torch.uint8, device=device) for e in expected]
    del poison
    outputs = gather_rows(tensors, index.to(device), backend=backend)
    assert len(outputs) == len(tensors)
    for out, tensor, want in zip(outputs, tensors, expected):
        assert out.device == tensor.device
        assert_bitwise_equal(out, want)
        assert_layout(out, tensor, index.numel())
    assert_no_alias(outputs, tensors)
    for out in outputs:
        out.fill_(0)  # the inputs are random, so zeros written through an alias would show
    for tensor, original in zip(tensors, originals):
        assert_bitwise_equal(tensor, original)  # writing the outputs leaves the inputs alone


def check_many_tensors(backend, device):
    """More tensors than one CUDA launch takes (64), of all sizes."""
    generator = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float16, torch.int64, torch.bool, torch.float64]
    tensors = [
        make_tensor(9, (1 + i % 5, 1 + i % 3), dtypes[i % len(dtypes)], "contiguous", generator, device)
        for i in range(150)
    ]
    index = torch.tensor([8, 0, 3, 3, 7])
    for out, want in zip(gather_rows(tensors, index.to(device), backend=backend), expected_rows(tensors, index)):
        assert_bitwise_equal(out, want)


def check_small_batches(backend, device):
    for batch, index in [(1, [0]), (1, [0, 0, 0]), (1, []), (0, []), (2, [1])]:
        tensors = mixed_tensors(batch, seed=batch, device=device)
        index = torch.tensor(index, dtype=torch.int64)
        outputs = gather_rows(tensors, index.to(device), backend=backend)
        for out, tensor, want in zip(outputs, tensors, expected_rows(tensors, index)):
            assert_bitwise_equal(out, want)
            assert_layout(out, tensor, index.numel())


def check_out_of_range(backend, device):
    tensors = mixed_tensors(4, seed=1, device=device, specs=MIXED[:3])
    for values, position, value in [([0, 4, 1], 1, 4), ([2, 1, -1], 2, -1), ([7], 0, 7)]:
        index = torch.tensor(values, device=device)
        message = rf"index\[{position}\] = {value} is out of range for tensors of 4 rows"
        if backend == "cuda":  # checks the index's range in one synchronisation, without a position
            message = r"index values range over \[-?\d+, \d+\] but must lie in \[0, 4\)"
        with pytest.raises(IndexError, match=message):
            gather_rows(tensors, index, backend=backend)
    with pytest.raises(IndexError):
        gather_rows(mixed_tensors(0, seed=1, device=device, specs=MIXED[:1]), torch.tensor([0], device=device),
                    backend=backend)


def check_gradients(backend, device):
    """gradcheck in float64 through a list that also holds non-differentiable tensors; repeated indices."""
    # Finite values (random_values' NaNs and infinities would make finite differences meaningless).
    generator = torch.Generator().manual_seed(4)
    randn = lambda *shape: torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    nchw = randn(4, 2, 1, 2).requires_grad_()
    channels_last = randn(4, 2, 2, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    vector = randn(4).requires_grad_()
    positions = torch.arange(4, device=device)
    index = torch.tensor([3, 1, 1, 0, 3, 3], device=device)

    def function(a, b, c):
        outputs = gather_rows([a, positions, b, c], index, backend=backend)
        assert not outputs[1].requires_grad
        return outputs[0], outputs[2], outputs[3]

    # fast_mode: random projections of the Jacobians instead of every entry (the Triton interpreter is slow).
    # On CUDA the backward's index_add sums the repeated rows (3 appears three times) with atomics, in
    # any order; gradcheck's reentrancy check compares two backward passes bit for bit.
    with deterministic_on(device):
        assert torch.autograd.gradcheck(function, (nchw, channels_last, vector), fast_mode=True)
        assert torch.autograd.gradgradcheck(function, (nchw, channels_last, vector), fast_mode=True)
    # Rows never selected (row 2) get zero gradient.
    (grad,) = torch.autograd.grad(function(nchw, channels_last, vector)[0].sum(), nchw)
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))
    assert torch.equal(grad[3], torch.full_like(grad[3], 3.0))


CHECKS = {
    **{
        f"mixed/batch{batch}/{index_name}": (lambda b, d, batch=batch, name=index_name: check_mixed(b, d, batch, name))
        for batch in (1, 5, 64)
        for index_name in index_cases(batch, 0)
    },
    "many-tensors": check_many_tensors,
    "small-batches": check_small_batches,
    "out-of-range": check_out_of_range,
    "gradients": check_gradients,
}


BACKENDS = backends("cpu-extension", "reference", "cuda-extension", "reference-cuda", "triton-gpu")


@pytest.mark.parametrize("check", list(CHECKS))
def test_backend(backend_and_device, check):
    CHECKS[check](*backend_and_device)


# ---------------------------------------------------------------------------
# Properties over random shapes, layouts and indices (the CPU kernel).
# ---------------------------------------------------------------------------

LAYOUTS_4D = ["contiguous", "channels_last", "channel_slice", "channels_last_slice", "transposed", "strided",
              "batch_innermost", "expand_batch", "expand_inner", "row_offset"]


@needs_extension
@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 6),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool, torch.uint8]),
    layout=st.sampled_from(LAYOUTS_4D),
    data=st.data(),
)
def test_cpu_matches_index_select_on_random_inputs(batch, shape, dtype, layout, data):
    if layout in ("channels_last", "channels_last_slice"):
        shape = (shape + [2, 3, 1])[:3]  # these layouts need a 4-D tensor
    if layout in ("transposed",) and len(shape) < 2:
        shape = shape + [3]
    tensor = make_tensor(batch, tuple(shape), dtype, layout, torch.Generator().manual_seed(batch))
    values = data.draw(st.lists(st.integers(0, batch - 1), max_size=12)) if batch else []
    index = torch.tensor(values, dtype=torch.int64)
    positions = torch.arange(batch)
    outputs = gather_rows([tensor, positions], index, backend="cpu")
    for out, source in zip(outputs, [tensor, positions]):
        assert_bitwise_equal(out, source.index_select(0, index))
        assert_layout(out, source, len(values))


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_raises_clear_error(backend):
    tensor = torch.randn(4, 3)
    index = torch.tensor([0, 2])

    def call(tensors, index=index, **kwargs):
        return gather_rows(tensors, index, backend=backend, **kwargs)

    with pytest.raises(TypeError, match=r"list or tuple of tensors, got Tensor"):
        call(tensor)
    with pytest.raises(ValueError, match=r"at least one tensor"):
        call([])
    with pytest.raises(TypeError, match=r"tensor 1 is a int, not a torch.Tensor"):
        call([tensor, 3])
    with pytest.raises(ValueError, match=r"tensor 1 must have at least one dimension; it has shape \(\), "
                                         r"dtype torch.float32, device cpu"):
        call([tensor, torch.tensor(1.0)])
    with pytest.raises(ValueError, match=r"tensor 2 \(shape \(5, 2\), dtype torch.int64, device cpu\) has 5 rows "
                                         r"but tensor 0 \(shape \(4, 3\), dtype torch.float32, device cpu\) has 4"):
        call([tensor, tensor, torch.zeros(5, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"tensor 1 \(shape \(4, 3\), dtype torch.float32, device meta\) is not on "
                                         r"the index's device cpu"):
        call([tensor, torch.empty(4, 3, device="meta")])
    with pytest.raises(TypeError, match=r"1-D int64 index, got one of shape \(2,\), dtype torch.int32"):
        call([tensor], index.int())
    with pytest.raises(TypeError, match=r"1-D int64 index, got one of shape \(1, 2\), dtype torch.int64"):
        call([tensor], index[None])
    with pytest.raises(TypeError, match=r"index to be a torch.Tensor, got list"):
        call([tensor], [0, 2])
    with pytest.raises(IndexError, match=r"index\[1\] = -2 is out of range for tensors of 4 rows"):
        call([tensor], torch.tensor([0, -2]))


@needs_extension
def test_cpu_kernel_checks_indices_even_when_told_not_to():
    with pytest.raises(IndexError, match=r"index\[2\] = 9 is out of range for tensors of 3 rows"):
        gather_rows([torch.randn(3, 2)], torch.tensor([0, 1, 9]), check_index=False, backend="cpu")


@needs_extension
def test_compiled_op_rejects_bad_input_itself():
    # Direct torch.ops calls bypass the Python validation; the kernel must still refuse.
    op = torch.ops.ranet_fast.gather_rows
    index = torch.tensor([0])
    with pytest.raises(RuntimeError, match=r"needs at least one tensor"):
        op([], index)
    with pytest.raises(RuntimeError, match=r"1-D int64 index, got a 1-D Int tensor"):
        op([torch.randn(2)], index.int())
    with pytest.raises(RuntimeError, match=r"tensor 1 has 3 rows \(shape \[3, 1\]\) but tensor 0 has 2"):
        op([torch.randn(2), torch.randn(3, 1)], index)
    with pytest.raises(RuntimeError, match=r"tensor 0 must have at least one dimension"):
        op([torch.tensor(1.0)], index)
    with pytest.raises(IndexError, match=r"index\[0\] = 2 is out of range"):
        op([torch.randn(2)], torch.tensor([2]), False)


def test_automatic_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("RANET_FAST_BACKEND", raising=False)
    expected = "cpu" if _extension.extension_loaded() else "reference"
    assert _extension.resolve_backend("gather_rows", torch.empty(1), None, "gather_rows") == expected


def test_output_strides_rule():
    # Contiguous and channels_last keep their layout; empty dims count as 1 like torch's strides.
    assert output_strides((8, 3, 4, 5), (60, 20, 5, 1)) == (60, 20, 5, 1)
    assert output_strides((8, 3, 4, 5), (60, 1, 15, 3)) == (60, 1, 15, 3)
    empty = torch.empty(8, 3, 0, 5)
    assert output_strides(empty.shape, empty.stride()) == empty.stride() == (15, 5, 5, 1)
    # A channel slice of channels_last packs to channels_last; batch-innermost packs its inner dims.
    assert output_strides((8, 2, 4, 5), (100, 1, 25, 5)) == (40, 1, 10, 2)
    assert output_strides((8, 2, 3), (1, 24, 8)) == (6, 3, 1)
    assert output_strides((8,), (3,)) == (1,)


# ---------------------------------------------------------------------------
# torch.library integration.
# ---------------------------------------------------------------------------


def opcheck_inputs(device):
    generator = torch.Generator().manual_seed(6)
    specs = [((2, 3, 3), torch.float64, "contiguous"), ((3, 2, 2), torch.float64, "channels_last"),
             ((2, 3, 3), torch.float32, "channels_last_slice"), ((3, 4), torch.float64, "expand_inner"),
             ((), torch.int64, "contiguous"), ((2, 3), torch.bool, "row_offset")]
    # Finite values: opcheck compares outputs and gradients with NaN != NaN.
    tensors = [make_tensor(5, shape, dtype, layout, generator, device, specials=False) for shape, dtype, layout in specs]
    tensors[0].requires_grad_()
    tensors[1].requires_grad_()
    return tensors, torch.tensor([4, 0, 0, 2], device=device)


@needs_extension
def test_op_passes_opcheck(device):
    tensors, index = opcheck_inputs(device)
    torch.library.opcheck(torch.ops.ranet_fast.gather_rows.default, (tensors, index, True))
    torch.library.opcheck(torch.ops.ranet_fast.gather_rows.default, (tensors, index[:0], False))


def compile_check(backend, op_name):
    """torch.compile(fullgraph=True) of a compaction step: the op shows up in the graph; aot_eager gradients.

    The engine's check_index=False and the checked form: the index check lives inside the op, so
    neither breaks the graph.
    """
    for check_index in (False, True):
        compile_step(backend, op_name, check_index)


def compile_step(backend, op_name, check_index):
    def step(features, positions, index):
        kept_features, kept_positions = gather_rows([features * 2, positions], index, check_index=check_index,
                                                    backend=backend)
        return kept_features.relu(), kept_positions + 1

    compiled, graph_ops = compile_recording_ops(step)
    features = torch.randn(6, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    positions, index = torch.arange(6), torch.tensor([5, 2, 2])
    for got, want in zip(compiled(features, positions, index), step(features, positions, index)):
        assert torch.equal(got, want)
    assert op_name in graph_ops, graph_ops

    aot = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaf, eager_leaf = features.clone().requires_grad_(), features.clone().requires_grad_()
    aot(leaf, positions, index)[0].square().sum().backward()
    step(eager_leaf, positions, index)[0].square().sum().backward()
    assert torch.equal(leaf.grad, eager_leaf.grad)


@needs_extension
def test_compiled_op_under_torch_compile_fullgraph():
    compile_check("cpu", "ranet_fast.gather_rows")


# ---------------------------------------------------------------------------
# The Triton backend on CPU tensors under the interpreter, in a subprocess.
# ---------------------------------------------------------------------------


def check_triton_kernel_writes_every_byte(backend, device):
    """The kernel function writes into NaN/0xFF-poisoned outputs: every byte must be overwritten."""
    from ranet_fast.kernels import gather_rows as kernels
    from ranet_fast.ops.gather_rows import allocate_outputs, make_row_dense

    tensors = mixed_tensors(7, seed=8, device=device)
    index = torch.tensor([6, 0, 6, 3], device=device)
    outputs = allocate_outputs(tensors, index.numel())
    for out in outputs:
        torch.empty(0, dtype=torch.uint8, device=device).set_(out.untyped_storage()).fill_(0xFF)
    kernels.gather_rows_triton(outputs, [make_row_dense(tensor) for tensor in tensors], index)
    for out, want in zip(outputs, expected_rows(tensors, index)):
        assert_bitwise_equal(out, want)


def check_triton_opcheck(backend, device):
    tensors, index = opcheck_inputs(device)
    torch.library.opcheck(torch.ops.ranet_fast.gather_rows_triton.default, (tensors, index, True))


def check_triton_compiles_fullgraph(backend, device):
    compile_check("triton", "ranet_fast.gather_rows_triton")


TRITON_CHECKS = {
    **CHECKS,
    "kernel-writes-every-byte": check_triton_kernel_writes_every_byte,
    "opcheck": check_triton_opcheck,
    "compiles-fullgraph": check_triton_compiles_fullgraph,
}


def triton_interpreter_checks():
    return {name: functools.partial(check, "triton") for name, check in TRITON_CHECKS.items()}


def test_triton_interpreter_was_used(triton_interpreter_report):
    assert triton_interpreter_report["interpreted"]


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)


@pytest.mark.skipif(not HAS_GPU, reason=NO_CUDA_GPU)
@pytest.mark.parametrize("check", ["kernel-writes-every-byte", "opcheck"])
def test_triton_gpu_extras(check):
    TRITON_CHECKS[check]("triton", "cuda")
