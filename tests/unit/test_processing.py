"""Prompt processor (expansion, tokenisation, bounds, padding) against the golden reference."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.image_processing import ImageProcessor
from minicpmv.processing import IMAGE_TAG, MiniCPMVProcessor, ProcessorOutput
from tests.golden_images import (
    GOLDEN_DIR,
    load_lut,
    load_model_cases,
    load_npz,
    load_processor_cases,
    make_image,
)

TOKEN_IDS = load_model_cases()["token_ids"]
MODEL_CASES = {case["name"]: case for case in load_model_cases()["cases"]}
PROCESSOR_CASES = {case["name"]: case for case in load_processor_cases()["cases"]}


class StandInTokenizer:
    """The README's stand-in for the real tokenizer.

    Special-token strings map to their ids, ``"\\n"`` to 198, each digit to 15..24 and ``"[N]"`` to id N; any
    other text is an error.
    """

    def __init__(self, token_ids: dict) -> None:
        self.vocab: dict[str, int] = dict(token_ids["special"])
        self.vocab["\n"] = token_ids["newline"]
        self.vocab.update(token_ids["digits"])
        specials = sorted(token_ids["special"], key=len, reverse=True)
        self._pattern = re.compile("|".join([re.escape(s) for s in specials] + [r"\[(\d+)\]", r"\n", r"\d"]))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, pos = [], 0
        while pos < len(text):
            match = self._pattern.match(text, pos)
            if match is None:
                raise ValueError(f"stand-in tokenizer cannot encode {text[pos : pos + 20]!r}")
            ids.append(int(match.group(1)) if match.group(1) is not None else self.vocab[match.group(0)])
            pos = match.end()
        return ids

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab[token]


@functools.cache
def processor() -> MiniCPMVProcessor:
    return MiniCPMVProcessor(ImageProcessor.from_pretrained(GOLDEN_DIR / "tiny"), StandInTokenizer(TOKEN_IDS))


@functools.cache
def model_npz() -> dict[str, np.ndarray]:
    return load_npz("model_cases.npz")


def test_stand_in_tokenizer_follows_the_readme() -> None:
    tok = StandInTokenizer(TOKEN_IDS)
    assert tok.encode("<|im_start|>[8948]\n<image_id>10</image_id>[0]<unk>") == [
        151644, 8948, 198, 151658, 16, 15, 151659, 0, 128244,
    ]  # fmt: skip


# --- golden model cases -----------------------------------------------------------------------------------


@functools.cache
def run_model_case(name: str) -> ProcessorOutput:
    case = MODEL_CASES[name]
    prompts = [sample["prompt"] for sample in case["samples"]]
    images = [[make_image(img["recipe"]) for img in sample["images"]] for sample in case["samples"]]
    return processor()(prompts, images, case["max_slice_nums"], case["use_image_id"])


@pytest.mark.parametrize("name", MODEL_CASES)
def test_expanded_prompt_matches_golden(name: str) -> None:
    case = MODEL_CASES[name]
    for sample in case["samples"]:
        images = [make_image(img["recipe"]) for img in sample["images"]]
        text, processed = processor().expand_prompt(
            sample["prompt"], images, case["max_slice_nums"], case["use_image_id"]
        )
        assert text == sample["expanded_prompt"]
        assert [p.grid for p in processed] == [
            tuple(img["grid_cols_rows"]) if img["grid_cols_rows"] else None for img in sample["images"]
        ]


@pytest.mark.parametrize("name", MODEL_CASES)
def test_ids_mask_and_bounds_match_golden(name: str) -> None:
    case, npz, out = MODEL_CASES[name], model_npz(), run_model_case(name)
    assert out.input_ids.dtype == torch.int64 and out.attention_mask.dtype == torch.int64
    assert tuple(out.input_ids.shape) == (case["batch_size"], case["seq_len"])
    np.testing.assert_array_equal(out.input_ids.numpy(), npz[f"{name}__input_ids"])
    np.testing.assert_array_equal(out.attention_mask.numpy(), npz[f"{name}__attention_mask"])
    for b, sample in enumerate(case["samples"]):
        assert int((out.attention_mask[b] == 0).sum()) == sample["n_pad"]
        bounds = out.image_bounds[b]
        assert bounds.dtype == torch.int64 and tuple(bounds.shape) == (sample["n_chunks"], 2)
        np.testing.assert_array_equal(bounds.numpy(), npz[f"{name}__image_bound_s{b}"].reshape(-1, 2))
        assert bounds.tolist() == sample["image_bound"]
        unk = TOKEN_IDS["special"]["<unk>"]
        for start, end in bounds.tolist():
            assert out.input_ids[b, start:end].eq(unk).all()
    assert out.image_sizes == [[tuple(size) for size in sizes] for sizes in case["image_sizes"]]


@pytest.mark.parametrize("name", MODEL_CASES)
def test_tgt_sizes_and_pixels_match_golden(name: str) -> None:
    case, npz, out, lut = MODEL_CASES[name], model_npz(), run_model_case(name), load_lut()
    for b, sample in enumerate(case["samples"]):
        assert out.tgt_sizes[b].dtype == torch.int32
        assert out.tgt_sizes[b].tolist() == sample.get("tgt_sizes_hw", [])
        assert len(out.pixel_values[b]) == sample["n_chunks"]
    if not case["pixel_code_keys"]:
        assert all(t.shape == (0, 2) for t in out.tgt_sizes)
        return
    np.testing.assert_array_equal(torch.cat(out.tgt_sizes).numpy(), npz[f"{name}__tgt_sizes"])
    chunks = [chunk for sample_chunks in out.pixel_values for chunk in sample_chunks]
    for chunk, key in zip(chunks, case["pixel_code_keys"], strict=True):
        assert chunk.dtype == torch.float32
        np.testing.assert_array_equal(chunk.numpy(), lut[npz[key]])


# --- golden processor cases through the processor ---------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSOR_CASES)
def test_single_tag_prompt_gives_placeholder_ids(name: str) -> None:
    case = PROCESSOR_CASES[name]
    call = case["call"]
    sample = processor().encode(
        IMAGE_TAG, [make_image(case["recipe"])], call["max_slice_nums"], call["use_image_id"]
    )
    assert sample.input_ids == case["placeholder_ids"]
    assert [list(b) for b in sample.image_bounds] == case["image_bound"] == case["placeholder_image_bound"]


# --- behaviour beyond the golden data ---------------------------------------------------------------------


def test_token_zero_is_attended() -> None:
    out = processor()(["[5][0][0]", "[0]"])
    assert out.input_ids.tolist() == [[5, 0, 0], [0, 0, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_no_images_gives_empty_tensors() -> None:
    out = processor()(["[7]\n"])
    assert out.pixel_values == [[]] and out.image_sizes == [[]]
    assert out.image_bounds[0].shape == (0, 2) and out.image_bounds[0].dtype == torch.int64
    assert out.tgt_sizes[0].shape == (0, 2) and out.tgt_sizes[0].dtype == torch.int32


def test_image_ids_count_across_the_prompt() -> None:
    images = [Image.new("RGB", (60, 40)) for _ in range(3)]
    text, _ = processor().expand_prompt(f"{IMAGE_TAG}[1]{IMAGE_TAG}\n{IMAGE_TAG}", images)
    assert re.findall(r"<image_id>(\d+)</image_id>", text) == ["0", "1", "2"]


@pytest.mark.parametrize(("n_tags", "n_images"), [(1, 0), (0, 1), (2, 1), (1, 2)])
def test_tag_image_count_mismatch(n_tags: int, n_images: int) -> None:
    images = [Image.new("RGB", (30, 30))] * n_images
    with pytest.raises(ValueError, match=rf"{n_tags} image tag.*{n_images} image"):
        processor().encode("[3]".join([IMAGE_TAG] * n_tags), images)


def test_near_miss_tag_is_not_a_tag() -> None:
    # The original's regex would count "(<image>x</image>)" as a tag; we only count the literal.
    with pytest.raises(ValueError, match="1 image tag"):
        processor().encode(f"{IMAGE_TAG}(<image>x</image>)", [Image.new("RGB", (30, 30))] * 2)


@pytest.mark.parametrize(
    "text",
    ["<image>", "</slice>", "<image></image>", "<slice>[5]</slice>", "<image>" + "<unk>" * 64 + "</image>"],
)
def test_literal_image_tokens_in_text_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="literally"):
        processor().encode(f"{IMAGE_TAG}\n{text}", [Image.new("RGB", (30, 30))])
    with pytest.raises(ValueError, match="literally"):
        processor()([f"[1]{text}"])


def test_bad_batch_arguments() -> None:
    with pytest.raises(ValueError, match="at least one"):
        processor()([])
    with pytest.raises(ValueError, match="2 prompt"):
        processor()(["[1]", "[2]"], [[]])
    with pytest.raises(ValueError, match="list of strings"):
        processor()("[1]")  # type: ignore[arg-type]
