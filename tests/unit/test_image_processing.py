"""Image processor against the golden reference (tests/fixtures/golden) and MODEL_FACTS.md §5."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from minicpmv.image_processing import (
    ImageProcessor,
    PreprocessorConfig,
    ProcessedImage,
    ensure_divide,
    find_best_resize,
    get_refine_size,
    get_sliced_grid,
    reshape_by_patch,
)
from tests.golden_images import (
    GOLDEN_DIR,
    chunk_fingerprint,
    load_lut,
    load_npz,
    load_processor_cases,
    make_array,
    make_image,
    rgb_sha256,
    sample_codes,
)

TINY_DIR = GOLDEN_DIR / "tiny"
CASES = {case["name"]: case for case in load_processor_cases()["cases"]}
STORED_CASES = [name for name, case in CASES.items() if "array_keys" in case]
PNG_CASES = [name for name, case in CASES.items() if "png_key" in case]


@functools.cache
def processor() -> ImageProcessor:
    """The processor configured from the golden checkpoint's preprocessor_config.json."""
    return ImageProcessor.from_pretrained(TINY_DIR)


@functools.cache
def processed(name: str) -> ProcessedImage:
    case = CASES[name]
    return processor().preprocess(make_image(case["recipe"]), case["call"]["max_slice_nums"])


# --- golden processor cases ------------------------------------------------------------------------------


def test_golden_has_the_documented_cases() -> None:
    assert len(CASES) == 16
    assert sorted(STORED_CASES) == sorted(PNG_CASES) == ["p100x30", "p28x28", "p300x200"]


def test_lut_matches_the_json_copy() -> None:
    lut = load_lut()
    assert lut.dtype == np.float32 and lut.shape == (256,)
    np.testing.assert_array_equal(lut, np.array(load_processor_cases()["lut"], dtype=np.float32))


@pytest.mark.parametrize("name", CASES)
def test_recipe_regenerates_the_image(name: str) -> None:
    case = CASES[name]
    array = make_array(case["recipe"])
    assert hashlib.sha256(array.tobytes()).hexdigest() == case["source_array_sha256"]
    image = make_image(case["recipe"])
    assert image.mode == case["recipe"].get("mode", "RGB")
    assert list(image.size) == case["image_size_wh"]
    assert rgb_sha256(image) == case["rgb_sha256"]


@pytest.mark.parametrize("name", PNG_CASES)
def test_png_decodes_to_the_recipe_image(name: str) -> None:
    case = CASES[name]
    png = load_npz("processor_arrays.npz")[case["png_key"]]
    with Image.open(io.BytesIO(png.tobytes())) as decoded:
        decoded.load()
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), make_array(case["recipe"]))


@pytest.mark.parametrize("name", CASES)
def test_geometry_matches_golden(name: str) -> None:
    case, out = CASES[name], processed(name)
    assert out.grid == (tuple(case["grid_cols_rows"]) if case["grid_cols_rows"] else None)
    assert out.overview_size == tuple(case["overview_size_wh"])
    assert out.refine_size == (tuple(case["refine_size_wh"]) if case["refine_size_wh"] else None)
    assert out.image_size == tuple(case["image_size_wh"])
    assert out.num_chunks == case["n_chunks"]
    assert out.tgt_sizes.dtype == np.int64
    assert out.tgt_sizes.tolist() == case["tgt_sizes_hw"]
    p = processor().config.patch_size
    assert [[p * w, p * h] for h, w in out.tgt_sizes.tolist()] == case["chunk_sizes_wh"]


@pytest.mark.parametrize("name", CASES)
def test_placeholder_matches_golden(name: str) -> None:
    case = CASES[name]
    text = processor().placeholder(processed(name), case["call"]["image_idx"], case["call"]["use_image_id"])
    assert text == case["placeholder"]


@pytest.mark.parametrize("name", CASES)
def test_pixels_match_golden_bit_exactly(name: str) -> None:
    case, out = CASES[name], processed(name)
    assert len(out.chunks) == len(case["chunks"])
    for k, (chunk, golden) in enumerate(zip(out.chunks, case["chunks"], strict=True)):
        assert chunk.dtype == np.float32
        fingerprint = chunk_fingerprint(chunk)
        assert fingerprint["shape"] == golden["shape"], f"chunk {k}"
        assert sample_codes(chunk) == golden["sample_code"], f"chunk {k}: sampled pixels differ"
        assert fingerprint["sha256_f32le"] == golden["sha256_f32le"], f"chunk {k}"
        assert fingerprint["mean"] == pytest.approx(golden["mean"], rel=1e-9, abs=1e-12)
        assert fingerprint["std"] == pytest.approx(golden["std"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", STORED_CASES)
def test_full_arrays_match_stored_codes(name: str) -> None:
    arrays, lut = load_npz("processor_arrays.npz"), load_lut()
    out = processed(name)
    for chunk, key in zip(out.chunks, CASES[name]["array_keys"], strict=True):
        np.testing.assert_array_equal(chunk, lut[arrays[key]])


# --- MODEL_FACTS.md §5.7 worked examples and §5.2 tie-breaks ------------------------------------------------

# (W, H): grid (cols, rows), overview (W, H), overview tgt (h, w), refine (W, H), slice (W, H), slice tgt,
# number of chunks
WORKED_EXAMPLES = {
    (448, 448): (None, (448, 448), (32, 32), None, None, None, 1),
    (300, 200): (None, (546, 364), (26, 39), None, None, None, 1),
    (640, 480): ((2, 1), (518, 392), (28, 37), (728, 546), (364, 546), (39, 26), 3),
    (1000, 750): ((2, 2), (518, 392), (28, 37), (1036, 784), (518, 392), (28, 37), 5),
    (1024, 1024): ((3, 2), (448, 448), (32, 32), (1092, 1092), (364, 546), (39, 26), 7),
    (1344, 1344): ((3, 3), (448, 448), (32, 32), (1344, 1344), (448, 448), (32, 32), 10),
    (1920, 1080): ((4, 2), (602, 336), (24, 43), (1680, 952), (420, 476), (34, 30), 9),
    (1080, 1920): ((2, 4), (336, 602), (43, 24), (952, 1680), (476, 420), (30, 34), 9),
    (4000, 500): ((8, 1), (1260, 154), (11, 90), (3584, 448), (448, 448), (32, 32), 9),
    (2000, 100): (None, (2002, 98), (7, 143), None, None, None, 1),
}


@pytest.mark.parametrize("size", WORKED_EXAMPLES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_worked_examples(size: tuple[int, int]) -> None:
    grid, overview, overview_tgt, refine, slice_wh, slice_tgt, n_chunks = WORKED_EXAMPLES[size]
    proc = processor()
    out = proc.preprocess(Image.new("RGB", size, (10, 200, 30)))
    assert out.grid == grid
    assert out.overview_size == overview
    assert out.refine_size == refine
    assert out.num_chunks == n_chunks
    assert out.tgt_sizes[0].tolist() == list(overview_tgt)
    assert out.chunks[0].shape == (3, 14, 14 * overview_tgt[0] * overview_tgt[1])
    for tgt, chunk in zip(out.tgt_sizes[1:].tolist(), out.chunks[1:], strict=True):
        assert tgt == list(slice_tgt)
        assert [14 * tgt[1], 14 * tgt[0]] == list(slice_wh)
        assert chunk.shape == (3, 14, 14 * tgt[0] * tgt[1])
    text = proc.placeholder(out, 0)
    assert text.count("<unk>") == 64 * n_chunks


def _count_tokens(placeholder: str) -> int:
    """Token count of a placeholder: special tokens, single digits and newlines are one token each."""
    tokens = re.findall(r"<[^<>]+>|\d|\n", placeholder)
    assert "".join(tokens) == placeholder
    return len(tokens)


def test_1000x750_placeholder_has_334_tokens() -> None:
    out = processor().preprocess(Image.new("RGB", (1000, 750)))
    assert _count_tokens(processor().placeholder(out, 0)) == 334


@pytest.mark.parametrize(("size", "grid"), [((1024, 1024), (3, 2)), ((449, 449), (1, 2))])
def test_grid_tie_breaks(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert get_sliced_grid(size, 9, 448) == grid
    assert processor().preprocess(Image.new("RGB", size)).grid == grid


# --- helpers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [(21, 28), (35, 28), (49, 56), (20.9, 14), (3, 14), (0, 14), (7, 14), (448, 448)],
)
def test_ensure_divide_rounds_half_to_even(length: float, expected: int) -> None:
    assert ensure_divide(length, 14) == expected


def test_find_best_resize_and_refine_size_match_worked_example() -> None:
    assert find_best_resize((1000, 750), 448, 14) == (518, 392)
    assert find_best_resize((300, 200), 448, 14) == (294, 196)
    assert find_best_resize((300, 200), 448, 14, allow_upscale=True) == (546, 364)
    assert get_refine_size((1000, 750), (2, 2), 448, 14) == (1036, 784)


def test_grid_respects_max_slice_nums() -> None:
    assert get_sliced_grid((1344, 1344), 1, 448) is None
    assert get_sliced_grid((448, 448), 9, 448) is None
    assert get_sliced_grid((4000, 500), 4, 448) == (4, 1)


def test_reshape_by_patch_layout() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(3, 28, 42), dtype=np.uint8)
    out = reshape_by_patch(image, 14)
    assert out.shape == (3, 14, 14 * 6)
    for c in range(3):
        for patch in range(6):
            r, col = divmod(patch, 3)
            np.testing.assert_array_equal(
                out[c, :, 14 * patch : 14 * patch + 14],
                image[c, 14 * r : 14 * r + 14, 14 * col : 14 * col + 14],
            )


def test_normalisation_uses_config_mean_and_std() -> None:
    # 448x448 is not resized, so every code 0..255 reaches the normalisation in every channel.
    cfg = PreprocessorConfig(norm_mean=(0.1, 0.2, 0.3), norm_std=(0.4, 0.3, 0.7))
    x, y = np.meshgrid(np.arange(448), np.arange(448))
    codes = np.stack([(x + y) % 256, (x * 3 + y) % 256, (x + 7 * y) % 256], axis=-1).astype(np.uint8)
    out = ImageProcessor(cfg).preprocess(Image.fromarray(codes, mode="RGB"))
    layout = reshape_by_patch(codes.transpose(2, 0, 1), 14)
    for ch in range(3):
        mean, std = np.float32(cfg.norm_mean[ch]), np.float32(cfg.norm_std[ch])
        expected = (layout[ch].astype(np.float32) / np.float32(255) - mean) / std
        np.testing.assert_array_equal(out.chunks[0][ch], expected)


# --- robustness -------------------------------------------------------------------------------------------

ODD_SIZES = [(1, 1), (1, 3), (3, 1), (3, 3), (2, 5000), (5000, 2), (1, 20000), (20000, 1), (14, 14)]
ODD_MODES = ["L", "RGBA", "P", "I;16", "I", "F", "1", "LA", "CMYK"]


def _check_consistent(out: ProcessedImage, size: tuple[int, int]) -> None:
    assert out.image_size == size
    assert out.num_chunks == len(out.tgt_sizes) >= 1
    for (h, w), chunk in zip(out.tgt_sizes.tolist(), out.chunks, strict=True):
        assert h >= 1 and w >= 1
        assert chunk.dtype == np.float32 and chunk.shape == (3, 14, 14 * h * w)
        assert np.all(np.abs(chunk) <= 1.0)
    cols, rows = out.grid or (0, 0)
    assert out.num_chunks == 1 + cols * rows


@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_and_extreme_sizes_do_not_crash(size: tuple[int, int]) -> None:
    _check_consistent(processor().preprocess(Image.new("RGB", size, (200, 100, 50))), size)


@pytest.mark.parametrize("mode", ODD_MODES)
@pytest.mark.parametrize("size", [(1, 3), (3, 1), (40, 30)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_modes_are_converted_to_rgb(mode: str, size: tuple[int, int]) -> None:
    image = Image.new(mode, size)
    out = processor().preprocess(image)
    _check_consistent(out, size)
    rgb = processor().preprocess(image.convert("RGB"))
    np.testing.assert_array_equal(out.chunks[0], rgb.chunks[0])


def test_grey_image_is_grey_in_all_channels() -> None:
    out = processor().preprocess(Image.new("L", (30, 20), 77))
    np.testing.assert_array_equal(out.chunks[0], np.full_like(out.chunks[0], load_lut()[77]))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_bad_max_slice_nums_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="max_slice_nums"):
        processor().preprocess(Image.new("RGB", (20, 20)), value)  # type: ignore[arg-type]


def test_slice_mode_off_gives_overview_only() -> None:
    proc = ImageProcessor(PreprocessorConfig(slice_mode=False))
    out = proc.preprocess(Image.new("RGB", (1344, 1344)))
    assert out.grid is None and out.num_chunks == 1
    assert "<slice>" not in proc.placeholder(out, 0)


# --- configuration ----------------------------------------------------------------------------------------


def test_config_from_pretrained_reads_the_real_file() -> None:
    raw = json.loads((TINY_DIR / "preprocessor_config.json").read_text())
    cfg = PreprocessorConfig.from_pretrained(TINY_DIR)
    assert cfg == PreprocessorConfig()
    for key in (
        "max_slice_nums",
        "scale_resolution",
        "patch_size",
        "image_feature_size",
        "unk",
        "slice_start",
    ):
        assert getattr(cfg, key) == raw[key]
    assert cfg.norm_mean == tuple(raw["norm_mean"]) and cfg.norm_std == tuple(raw["norm_std"])


def test_config_missing_file_gives_defaults(tmp_path) -> None:
    assert PreprocessorConfig.from_pretrained(tmp_path) == PreprocessorConfig()


def test_config_invalid_json_is_a_value_error(tmp_path) -> None:
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PreprocessorConfig.from_pretrained(tmp_path)


def test_config_ignores_unknown_keys() -> None:
    cfg = PreprocessorConfig.from_dict(
        {"auto_map": {}, "version": 2.6, "something_new": 1, "max_slice_nums": 4}
    )
    assert cfg.max_slice_nums == 4


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"max_slice_nums": 0}, "max_slice_nums"),
        ({"patch_size": "14"}, "patch_size"),
        ({"scale_resolution": 448.0}, "scale_resolution"),
        ({"image_feature_size": True}, "image_feature_size"),
        ({"use_image_id": "yes"}, "use_image_id"),
        ({"slice_mode": 1}, "slice_mode"),
        ({"norm_mean": [0.5, 0.5]}, "norm_mean"),
        ({"norm_std": [0.5, 0.0, 0.5]}, "norm_std"),
        ({"unk": ""}, "unk"),
        ({"im_start": None}, "im_start"),
    ],
)
def test_config_rejects_bad_values(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PreprocessorConfig.from_dict(data)


def test_config_rejects_non_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        PreprocessorConfig.from_dict([1, 2])  # type: ignore[arg-type]
