"""The fused NF4 matmul (minicpmv/engine/kernels/nf4.py) under Triton's interpreter, against bitsandbytes' own
``dequantize_4bit`` + a float32 matmul, on weights quantized by bitsandbytes' ``quantize_4bit`` (nf4, blocksize
64, with and without double quantization): bitsandbytes' nibble order (proven on bytes of known codes, and
through the kernel with one-hot activations), every GEMV row count 1..8 with and without split-K, the tiled
kernel at 19 and 24 rows, fp16 / bf16 / float32 activations, bias, a tile of each of MiniCPM-V 2.6's LLM linear
shapes (the full matrix quantized, a 256-block-aligned slice of rows computed), and the tiny int4 checkpoint's
real Linear4bit layers. Row blocks of the weights carry scales of very different size (``_weight``), so an absmax
read from the wrong block shows; the same source is what the GPU runs (compiled by test_kernel_aot.py).
"""

from __future__ import annotations

import pytest
import torch

from minicpmv.engine.kernels import nf4
from minicpmv.offline import import_bitsandbytes

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

F = import_bitsandbytes().functional


def _weight(out_features: int, in_features: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian weights with each 64-block scaled by its own factor (e^N(0, 1): 0.1x to 10x), so the absmax of one
    block is far from its neighbours'."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randn(out_features, in_features // 64, 1, generator=generator).exp()
    w = torch.randn(out_features, in_features // 64, 64, generator=generator) * blocks
    return w.reshape(out_features, in_features).to(dtype)


def _quantized(out_features, in_features, dtype, nested, seed=0):
    packed, state = F.quantize_4bit(_weight(out_features, in_features, dtype, seed), quant_type="nf4", blocksize=64,
                                    compress_statistics=nested)  # fmt: skip
    return packed, state


def _expected(x, packed, state, bias=None, rows=None):
    """bitsandbytes' dequantized weight (in its quantization dtype, then the activations'), float32 matmul."""
    w = F.dequantize_4bit(packed, state)
    if rows is not None:
        w = w[rows]
    out = x.float() @ w.to(x.dtype).float().T
    return out if bias is None else out + bias.float()


def _check(got, expected, dtype):
    """Within the output's rounding: float32 accumulations in another order, one rounding to ``dtype``."""
    assert got.dtype == dtype and got.shape == expected.shape
    scale = float(expected.abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), expected, rtol=eps, atol=2 * eps * scale)


# -- bitsandbytes' storage ---------------------------------------------------------------------------------------


def _known_codes():
    """A [4, 64] fp32 weight whose values are NF4's table entries themselves (each 64-block holds +1.0, so its
    absmax is 1 and quantization is exact), codes ``(7 * i + 3 * row) % 16``: consecutive weights differ."""
    code = F.get_4bit_type("nf4", device="cpu")
    idx = (torch.arange(64)[None, :] * 7 + 3 * torch.arange(4)[:, None]) % 16
    idx[:, 5] = 15  # code 15 = +1.0
    return code[idx], idx


def test_bitsandbytes_packs_even_weights_in_the_high_nibble():
    w, idx = _known_codes()
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    flat = idx.reshape(-1)
    assert packed.dtype == torch.uint8 and packed.numel() == flat.numel() // 2
    assert packed.reshape(-1).tolist() == ((flat[0::2] << 4) | flat[1::2]).tolist()
    assert torch.equal(state.absmax, torch.ones(4))
    assert torch.equal(F.dequantize_4bit(packed, state), w)  # and its dequantization reads them back that way


@pytest.mark.parametrize("rows", [8, 16], ids=["gemv", "tiled"])
def test_the_kernel_reads_the_nibbles_in_bitsandbytes_order(rows):
    """One-hot activations pick single columns of W: output row ``r`` is W's column ``columns[r]`` (even: high
    nibble, odd: low nibble), exactly (in fp16, as bitsandbytes dequantizes into it)."""
    w, _ = _known_codes()
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    columns = torch.tensor([0, 1, 2, 3, 62, 63, 30, 31, 4, 5, 6, 7, 8, 9, 10, 11][:rows])
    x = torch.nn.functional.one_hot(columns, 64).to(torch.float16)
    got = nf4.nf4_matmul(x, packed, state)
    assert torch.equal(got, w[:, columns].T.half())


# -- random matrices ---------------------------------------------------------------------------------------------

OUT, IN = 96, 320  # 5 blocks a row (an uneven split-K); 96 columns: a partial column block at every BLOCK_N


@pytest.fixture(scope="module", params=[True, False], ids=["nested", "fp32-absmax"])
def fp16_weight(request):
    packed, state = _quantized(OUT, IN, torch.float16, request.param, seed=1)
    assert state.nested == request.param and (state.absmax.dtype == torch.uint8) == request.param
    return packed, state


@pytest.mark.parametrize("rows", range(1, 9))
def test_gemv_every_row_count_with_and_without_split(fp16_weight, rows):
    packed, state = fp16_weight
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=generator).to(torch.float16)
    bias = torch.randn(OUT, generator=generator).to(torch.float16)
    weight = nf4.NF4Weight(packed, state)
    for splits in (1, 3):  # 3 ranges of 2, 2 and 1 blocks
        _check(weight.matmul(x, bias, num_splits=splits), _expected(x, packed, state, bias), torch.float16)
    _check(weight.matmul(x, num_splits=2), _expected(x, packed, state), torch.float16)  # no bias


@pytest.mark.parametrize("rows", [19, 24])
def test_tiled(fp16_weight, rows):
    packed, state = fp16_weight
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=generator).to(torch.float16)
    bias = torch.randn(OUT, generator=generator).to(torch.float16)
    _check(nf4.nf4_matmul(x, packed, state, bias), _expected(x, packed, state, bias), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "fp32-absmax"])
def test_float32_and_bf16_activations(dtype, nested):
    packed, state = _quantized(OUT, IN, dtype, nested, seed=2)
    generator = torch.Generator().manual_seed(3)
    bias = torch.randn(OUT, generator=generator).to(dtype)
    weight = nf4.NF4Weight(packed, state)
    for rows, splits in ((1, 2), (5, 1), (19, None)):
        x = torch.randn(rows, IN, generator=generator).to(dtype)
        _check(weight.matmul(x, bias, num_splits=splits), _expected(x, packed, state, bias), dtype)


def test_leading_dimensions_strided_rows_and_a_bias_of_another_dtype():
    packed, state = _quantized(OUT, IN, torch.float16, True, seed=4)
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 3, IN + 64, generator=generator).to(torch.float16)
    x = wide[..., :IN]  # rows IN + 64 apart
    bias = torch.randn(OUT, generator=generator)  # float32: used in the activations' dtype
    got = nf4.nf4_matmul(x, packed, state, bias)
    assert got.shape == (2, 3, OUT)
    _check(got.reshape(6, OUT), _expected(x.reshape(6, IN), packed, state, bias.half()), torch.float16)


# -- MiniCPM-V 2.6's shapes: the whole matrix quantized, one tile of rows computed --------------------------------

FULL_SHAPES = {"q_o": (3584, 3584), "k_v": (512, 3584), "gate_up": (18944, 3584), "down": (3584, 18944)}


@pytest.mark.parametrize("shape", list(FULL_SHAPES), ids=list(FULL_SHAPES))
def test_a_tile_of_each_full_size_shape(shape):
    out_features, in_features = FULL_SHAPES[shape]
    packed, state = _quantized(out_features, in_features, torch.bfloat16, True, seed=6)
    weight = nf4.NF4Weight(packed, state)
    generator = torch.Generator().manual_seed(7)
    if out_features == 512:  # small enough to run whole: every column block of the launch
        tile, rows = weight, slice(0, 512)
    else:  # 128 rows near the end: their blocks start on a 256-block boundary (a row has 56 or 296 blocks)
        start = out_features - 160
        tile, rows = weight.rows(start, start + 128), slice(start, start + 128)
    x = torch.randn(1, in_features, generator=generator).to(torch.bfloat16)
    _check(tile.matmul(x, num_splits=2), _expected(x, packed, state, rows=rows), torch.bfloat16)
    if out_features != 512:  # the tiled kernel on 64 of those rows (the bf16 dot upcast under the interpreter)
        x = torch.randn(19, in_features, generator=generator).to(torch.bfloat16)
        rows = slice(rows.start, rows.start + 64)
        _check(tile.rows(0, 64).matmul(x), _expected(x, packed, state, rows=rows), torch.bfloat16)


# -- the tiny int4 checkpoint's real tensors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_model(tiny_int4):
    from minicpmv.loading import load_model

    return load_model(tiny_int4, dtype="float32")


def test_the_tiny_int4_checkpoints_llm_linears(int4_model):
    from minicpmv.engine.nf4_linear import llm_linear4bit

    layers = llm_linear4bit(int4_model)
    assert len(layers) == 7 * int4_model.config.num_hidden_layers
    generator = torch.Generator().manual_seed(8)
    for name, module in layers:
        state = module.weight.quant_state
        assert state.nested and state.blocksize == 64 and state.dtype == torch.bfloat16, name
        weight = nf4.NF4Weight.from_module(module)
        # bf16 activations: bitsandbytes' dequantization is bf16 (the checkpoint's dtype), as the kernel's
        for rows in (3, 17):
            x = torch.randn(rows, module.in_features, generator=generator).to(torch.bfloat16)
            bias = None if module.bias is None else module.bias.to(torch.bfloat16)
            _check(weight.matmul(x, bias), _expected(x, module.weight.data, state, bias), torch.bfloat16)
        # the model's float32: the kernel's weight is not rounded to bf16, bitsandbytes' is (within bf16's eps)
        x = torch.randn(2, module.in_features, generator=generator)
        expected = _expected(x, module.weight.data, state, module.bias)
        got = weight.matmul(x, module.bias)
        torch.testing.assert_close(got, expected, rtol=0, atol=2**-8 * float(expected.abs().max()))


# -- what the kernel refuses, and the launch parameters ----------------------------------------------------------


def test_storage_the_kernel_does_not_read_is_refused():
    w = _weight(64, 128, torch.float16, seed=9)
    packed, state = F.quantize_4bit(w, quant_type="fp4", blocksize=64)
    with pytest.raises(ValueError, match="nf4 only"):
        nf4.NF4Weight(packed, state)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=128)
    with pytest.raises(ValueError, match="blocks of 64"):
        nf4.NF4Weight(packed, state)
    packed, state = F.quantize_4bit(torch.randn(64, 96).half(), quant_type="nf4", blocksize=64)
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4.NF4Weight(packed, state)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked"):
        nf4.NF4Weight(packed, state)


def test_nested_row_slices_must_start_on_a_256_block_boundary():
    packed, state = _quantized(64, 256, torch.float16, True)  # 4 blocks a row: 64 rows per 256 blocks
    weight = nf4.NF4Weight(packed, state)
    with pytest.raises(ValueError, match="boundary"):
        weight.rows(32, 64)
    assert weight.rows(0, 32).out_features == 32


def test_launch_parameters():
    assert [nf4.gemv_config(r, torch.bfloat16).block_m for r in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert all(c.block_m * c.block_n == 128 for c in map(lambda r: nf4.gemv_config(r, torch.float16), range(1, 9)))
    with pytest.raises(ValueError):
        nf4.gemv_config(9, torch.bfloat16)
    # H100 (132 SMs) at 1 row: k/v (4 column blocks) as many splits as it has ranges of 4 blocks; gate/up (148
    # column blocks) 2; down (28 blocks, 296 a row) 10; on the CPU (no SMs) none.
    assert nf4.gemv_splits(512, 3584, 128, 132) == 14
    assert nf4.gemv_splits(18944, 3584, 128, 132) == 2
    assert nf4.gemv_splits(3584, 18944, 128, 132) == 10
    assert nf4.gemv_splits(3584, 3584, 128, 0) == 1
    assert [nf4.tiled_config(r, torch.bfloat16).block_m for r in (9, 16, 17, 4096)] == [16, 16, 64, 64]
    assert (nf4.tiled_config(24, torch.float32).block_n, nf4.tiled_config(24, torch.float32).num_stages) == (64, 1)
