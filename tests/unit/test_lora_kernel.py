"""The LoRA kernels (minicpmv/engine/kernels/lora.py) under Triton's interpreter, against the plain-torch
reference in float64: mixed slots with rows of no adapter (-1), runs longer than a tile, a slot in two separate
runs, ranks below, at and above a rank block, split-K partial sums (with ranges that hold no column), the
engine's concatenated stacks as views, ``out`` a column slice accumulated in place, padding tiles, an empty
table; float32 exact, fp16 and bf16 (dots upcast here) within their rounding. ``segment_tiles`` on its own.

The same source is what the GPU runs (compiled by test_kernel_aot.py): a planted off-by-one in a tile's row mask
(``rows < n_rows`` -> ``rows <= n_rows``, in either kernel) fails these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmv.engine.kernels import lora

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# 40 rows: a run of 20 (a full tile and a partial one), no-adapter rows between runs, slot 0 again later, single
# rows (decode), and a run that ends the step.
MIXED = [0] * 20 + [-1] * 3 + [1] * 2 + [2] + [0] * 5 + [-1] * 2 + [1] * 7


def _weights(generator, slots, rank, in_features, out_features):
    """A [S, R, in], B [S, out, R] scaled so that the delta is O(1)."""
    a = torch.randn(slots, rank, in_features, generator=generator) / in_features**0.5
    b = torch.randn(slots, out_features, rank, generator=generator) / rank**0.5
    return a, b


def _expected(x, a, b, out, row_slots):
    return out.double() + lora.lora_delta_reference(x.double(), a.double(), b.double(), row_slots)


def _run(x, a, b, out, row_slots, num_splits=1, pad_to=None, order=None):
    """``lora_delta`` over ``segment_tiles`` (in ``order`` if given) with x, out and h the first T rows of
    buffers one tile taller, whose guard rows (NaN) must stay untouched: nothing is written past the step."""
    tiles = torch.from_numpy(lora.segment_tiles(row_slots, lora.BLOCK_M, pad_to))
    if order is not None:
        tiles = tiles[order].contiguous()
    total, guard = x.shape[0], lora.BLOCK_M
    x_big = torch.cat([x, torch.full((guard, x.shape[1]), float("nan"), dtype=x.dtype)])
    out_big = torch.cat([out, torch.full((guard, out.shape[1]), float("nan"), dtype=out.dtype)])
    h_big = torch.full((num_splits, total + guard, a.shape[1]), float("nan"))
    lora.lora_delta(x_big[:total], a, b, out_big[:total], tiles, num_splits, h_big[:, :total])
    assert torch.isnan(out_big[total:]).all() and torch.isnan(h_big[:, total:]).all(), "wrote past the step's rows"
    return out_big[:total]


# -- segment_tiles ------------------------------------------------------------------------------------------------


def test_segment_tiles_cuts_runs_and_skips_rows_of_no_adapter():
    tiles = lora.segment_tiles([2, 2, 2, 2, 2, -1, 0, 1, 1, -1, -1, 2, 2], block_m=2)
    assert tiles.dtype == np.int32 and tiles.shape == (6, 3)
    assert tiles.tolist() == [[0, 2, 2], [2, 2, 2], [4, 1, 2], [6, 1, 0], [7, 2, 1], [11, 2, 2]]


def test_segment_tiles_mixed_step_covers_every_adapter_row_once():
    tiles = lora.segment_tiles(np.array(MIXED), 16)
    assert tiles.tolist() == [[0, 16, 0], [16, 4, 0], [23, 2, 1], [25, 1, 2], [26, 5, 0], [33, 7, 1]]
    covered = [-1] * len(MIXED)
    for first, rows, slot in tiles:
        assert 1 <= rows <= 16 and all(covered[t] == -1 for t in range(first, first + rows))
        covered[first : first + rows] = [slot] * rows
    assert covered == MIXED


def test_segment_tiles_empty_padding_and_errors():
    assert lora.segment_tiles([], 16).shape == (0, 3)
    assert lora.segment_tiles([-1, -1], 16).shape == (0, 3)
    assert lora.segment_tiles([0, 1, 2, 3], 16).tolist() == [[0, 1, 0], [1, 1, 1], [2, 1, 2], [3, 1, 3]]
    assert lora.segment_tiles([3, 3, 3], 2, pad_to=4).tolist() == [[0, 2, 3], [2, 1, 3], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="pad_to"):
        lora.segment_tiles([0, 1, 0], 16, pad_to=2)
    with pytest.raises(ValueError, match=">= -1"):
        lora.segment_tiles([0, -2], 16)


def test_shrink_splits_fill_the_gpu_with_ranges_of_256_columns_or_more():
    assert lora.shrink_splits(8, 3584, 132) == 14  # 8 decode tiles: 14 ranges of 256 columns
    assert lora.shrink_splits(8, 18944, 132) == lora.MAX_SPLITS
    assert lora.shrink_splits(512, 3584, 132) == 1  # a long prefill fills the GPU with tiles alone
    assert lora.shrink_splits(4, 256, 132) == 1  # the tiny model: one range
    assert lora.shrink_splits(4, 3584, 0) == 1  # the CPU


# -- the kernels --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, in_features, out_features, splits", [(16, 256, 96, 1), (8, 64, 256, 3), (80, 128, 32, 2)],
                         ids=["r16", "r8-split3", "r80-split2"])  # fmt: skip
def test_float32_equals_the_reference(rank, in_features, out_features, splits):
    """Exact dots: the reference to float32 rounding. r8: rank below the 16-wide block; three splits of a
    single 64-column block (two ranges empty: zero partials). r80: two rank blocks of 64 (shrink grid, expand
    loop)."""
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(len(MIXED), in_features, generator=generator)
    a, b = _weights(generator, 3, rank, in_features, out_features)
    out = torch.randn(len(MIXED), out_features, generator=generator)
    expected = _expected(x, a, b, out, MIXED)
    got = _run(x, a, b, out.clone(), MIXED, splits)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_order_of_the_tiles_does_not_matter():
    """Programs of a launch run in any order on the GPU (here: the table reversed, so a tile's neighbour runs
    first): each writes only its own rows of h and out."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(len(MIXED), 64, generator=generator)
    a, b = _weights(generator, 3, 16, 64, 48)
    out = torch.randn(len(MIXED), 48, generator=generator)
    order = torch.arange(len(lora.segment_tiles(MIXED))).flip(0)
    got = _run(x, a, b, out.clone(), MIXED, order=order)
    torch.testing.assert_close(got.double(), _expected(x, a, b, out, MIXED), rtol=1e-5, atol=1e-5)


def test_rows_of_no_adapter_and_outside_tiles_are_not_touched():
    """``out`` is added to in place: rows of slot -1 keep their values bit for bit (NaN too)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(len(MIXED), 64, generator=generator)
    a, b = _weights(generator, 3, 16, 64, 48)
    out = torch.randn(len(MIXED), 48, generator=generator)
    none = torch.tensor(MIXED) == -1
    out[none] = float("nan")
    got = _run(x, a, b, out.clone(), MIXED)
    assert torch.isnan(got[none]).all() and not torch.isnan(got[~none]).any()
    torch.testing.assert_close(got[~none].double(), _expected(x, a, b, out, MIXED)[~none], rtol=1e-5, atol=1e-5)


def test_padding_tiles_do_nothing_and_an_empty_table_launches_nothing(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    slots = [1] * 3 + [-1] + [0] * 18
    x = torch.randn(len(slots), 64, generator=generator)
    a, b = _weights(generator, 3, 16, 64, 32)
    out = torch.randn(len(slots), 32, generator=generator)
    got = _run(x, a, b, out.clone(), slots, pad_to=len(slots))  # 3 tiles, 19 of 0 rows
    torch.testing.assert_close(got.double(), _expected(x, a, b, out, slots), rtol=1e-5, atol=1e-5)

    def no_launch(interpret):
        raise AssertionError("an empty tile table launched a kernel")

    monkeypatch.setattr(lora, "_build", no_launch)
    assert torch.equal(_run(x, a, b, out.clone(), [-1] * len(slots)), out)
    kept = out.clone()
    lora.lora_delta(x, a, b, kept, torch.zeros((0, 3), dtype=torch.int32))
    assert torch.equal(kept, out)


def test_the_engines_concatenated_stacks_and_a_column_slice_of_out():
    """A [S * R, in] and B [out, S * R] (engine/lora.py's LoRAStacks) read through views; ``out`` the middle
    columns of a wider output (a fused projection's), whose other columns stay as they were."""
    generator = torch.Generator().manual_seed(3)
    slots, rank, in_features, out_features = 3, 16, 128, 64
    x = torch.randn(len(MIXED) + lora.BLOCK_M, in_features, generator=generator)[: len(MIXED)]
    a_cat = torch.randn(slots * rank, in_features, generator=generator) / in_features**0.5
    b_cat = torch.randn(out_features, slots * rank, generator=generator) / rank**0.5
    a = a_cat.view(slots, rank, in_features)
    b = b_cat.view(out_features, slots, rank).transpose(0, 1)
    wide = torch.randn(len(MIXED) + lora.BLOCK_M, 32 + out_features + 16, generator=generator)
    before = wide.clone()
    wide[len(MIXED) :] = float("nan")  # guard rows (as _run's); so is the tail of h
    h = torch.full((1, len(wide), rank), float("nan"))
    tiles = torch.from_numpy(lora.segment_tiles(MIXED))
    lora.lora_delta(x, a, b, wide[: len(MIXED), 32 : 32 + out_features], tiles, h=h[:, : len(MIXED)])
    assert torch.isnan(wide[len(MIXED) :]).all() and torch.isnan(h[:, len(MIXED) :]).all()
    wide, before = wide[: len(MIXED)], before[: len(MIXED)]
    expected = _expected(x, a.contiguous(), b.contiguous(), before[:, 32 : 32 + out_features], MIXED)
    torch.testing.assert_close(wide[:, 32 : 32 + out_features].double(), expected, rtol=1e-5, atol=1e-5)
    outside = [*range(32), *range(32 + out_features, wide.shape[1])]
    assert torch.equal(wide[:, outside], before[:, outside])


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"])
def test_half_precision_within_its_rounding(dtype, bound):
    """fp16 (native dots under the interpreter) and bf16 (dots upcast here: what the GPU's bf16 dot computes,
    float32 accumulation of exact products), against the reference on the same rounded inputs: within
    ``bound x (1 + |value|)`` (h rounded to the dtype for the expand, ``out`` once)."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(len(MIXED), 256, generator=generator).to(dtype)
    a, b = (w.to(dtype) for w in _weights(generator, 3, 16, 256, 128))
    out = torch.randn(len(MIXED), 128, generator=generator).to(dtype)
    expected = _expected(x, a, b, out, MIXED)
    got = _run(x, a, b, out.clone(), MIXED, num_splits=2)
    assert got.dtype == dtype
    error = (got.double() - expected).abs() / (1 + expected.abs())
    assert float(error.max()) <= bound
    # and the LoRA term is really there (not just the base output within the bound)
    assert float((got.double() - out.double()).abs().max()) > 0.5


def test_bad_arguments_are_refused():
    x, a, b = torch.randn(4, 64), torch.randn(2, 16, 64), torch.randn(2, 32, 16)
    tiles = torch.from_numpy(lora.segment_tiles([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="int32"):
        lora.lora_delta(x, a, b, torch.zeros(4, 32), tiles.long())
    with pytest.raises(ValueError, match="does not match"):
        lora.lora_delta(x, a.half(), b, torch.zeros(4, 32), tiles)
    with pytest.raises(ValueError, match="do not match"):
        lora.lora_delta(x, a, b, torch.zeros(4, 48), tiles)
    with pytest.raises(ValueError, match="num_splits"):
        lora.lora_delta(x, a, b, torch.zeros(4, 32), tiles, num_splits=lora.MAX_SPLITS + 1)
