"""Our model against what the ORIGINAL MiniCPM-V 2.6 code computed on the golden tiny checkpoint.

Inputs are the stored ids, bounds and pixels, so model and processor differences show up
separately (the processor has its own golden tests). Tolerance 2e-4 absolute: the reference's
own float32 noise is about 4e-5 (tests/fixtures/golden/README.md, "How to compare").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmv.devtools.device_checks import golden_case_inputs
from minicpmv.loading import load_model
from minicpmv.modeling.resampler import sincos_2d
from minicpmv.modeling.vision import position_ids_for

# Largest differences measured against the golden values (AMD EPYC, scripts/isa_matrix.sh variants): 1.4e-5
# (native AVX512 kernels), 4.5e-5 (AVX2 kernels: logit columns), 4.0e-5 (AVX2 + MKL's compatible sgemm order).
ATOL = 2e-4
STOP_IDS = (151645, 151643)


@pytest.fixture(scope="module")
def golden_model(golden_checkpoint):
    """Eager attention, as the reference ran."""
    return load_model(golden_checkpoint, dtype="float32", attn_implementation="eager")


@pytest.fixture(scope="module")
def golden_model_sdpa(golden_checkpoint):
    return load_model(golden_checkpoint, dtype="float32", attn_implementation="sdpa")


def test_position_buckets_match_reference(model_arrays, model_cases):
    flat, offsets = model_arrays["vision_bucket_flat"], model_arrays["vision_bucket_offsets"]
    for n in range(1, 65):
        ours = position_ids_for(1, n).numpy()  # one row: the ids are the column buckets
        np.testing.assert_array_equal(ours, flat[offsets[n - 1] : offsets[n]], err_msg=f"n={n}")
    # The quirk sizes named in MODEL_FACTS §3.3 really differ from floor(70 i / n) ...
    for n in (25, 49, 50, 55, 58):
        exact = np.array([70 * i // n for i in range(n)])
        assert not np.array_equal(position_ids_for(1, n).numpy(), exact), n
        assert str(n) in model_cases["vision_bucket_quirks"]
    # ... and rows are bucketed the same way as columns (70 * row bucket).
    np.testing.assert_array_equal(position_ids_for(25, 1).numpy(), 70 * flat[offsets[24] : offsets[25]])


def test_sincos_table_matches_reference(model_arrays):
    np.testing.assert_allclose(sincos_2d(256, 3, 5), model_arrays["sincos_3x5_D256"], atol=1e-6, rtol=0)


def test_vision_tower_output(golden_model, model_cases, model_arrays, lut):
    case = next(c for c in model_cases["cases"] if c["name"] == "single_small")
    inputs = golden_case_inputs(case, model_arrays, lut)
    pixels = inputs["pixel_values"][0][0][None]
    with torch.no_grad():
        hidden = golden_model.vpm(pixels, inputs["tgt_sizes"][0])
    np.testing.assert_allclose(
        hidden.numpy(), model_arrays["single_small__vpm_last_hidden_state"], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("name", ["single_small", "two_images", "batch2_left_pad"])
def test_vision_embeddings(golden_model, model_cases, model_arrays, lut, name):
    case = next(c for c in model_cases["cases"] if c["name"] == name)
    inputs = golden_case_inputs(case, model_arrays, lut)
    flat = [p for sample in inputs["pixel_values"] for p in sample]
    with torch.no_grad():
        embeds = golden_model.encode_images(flat, torch.from_numpy(model_arrays[f"{name}__tgt_sizes"]))
    np.testing.assert_allclose(embeds.numpy(), model_arrays[f"{name}__vision_embeds"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["text_only", "single_small", "two_images", "batch2_left_pad"])
def test_logits_and_greedy_ids(golden_model, model_cases, model_arrays, lut, name):
    case = next(c for c in model_cases["cases"] if c["name"] == name)
    inputs = golden_case_inputs(case, model_arrays, lut)
    with torch.no_grad():
        logits = golden_model(**inputs).logits
    valid = inputs["attention_mask"].bool().numpy()
    live = np.zeros(logits.shape[-1], dtype=bool)
    live[model_arrays["live_token_ids"]] = True

    np.testing.assert_allclose(logits[:, -1].numpy(), model_arrays[f"{name}__logits_last"], atol=ATOL, rtol=0)
    assert (logits[:, :, ~live] == 0).all(), "dead ids must have logit exactly 0"
    cols = logits[:, :, model_arrays["logit_columns"]].numpy()
    np.testing.assert_allclose(cols[valid], model_arrays[f"{name}__logits_cols"][valid], atol=ATOL, rtol=0)
    lse = torch.logsumexp(logits.double(), -1).numpy()
    np.testing.assert_allclose(
        lse[valid], model_arrays[f"{name}__logits_logsumexp"][valid], atol=ATOL, rtol=0
    )
    np.testing.assert_array_equal(
        logits.argmax(-1).numpy()[valid], model_arrays[f"{name}__logits_argmax"][valid]
    )

    generated = golden_model.generate_greedy(max_new_tokens=16, stop_token_ids=STOP_IDS, **inputs)
    assert generated == model_arrays[f"{name}__generated_ids"].tolist()


@pytest.mark.parametrize("name", ["text_only", "two_images", "batch2_left_pad"])
def test_sdpa_attention_matches_reference(golden_model_sdpa, model_cases, model_arrays, lut, name):
    """What we serve with: SDPA in the LLM and the vision tower gives the same last logits and ids."""
    case = next(c for c in model_cases["cases"] if c["name"] == name)
    inputs = golden_case_inputs(case, model_arrays, lut)
    with torch.no_grad():
        last = golden_model_sdpa(**inputs, logits_to_keep=1).logits[:, -1]
    np.testing.assert_allclose(last.numpy(), model_arrays[f"{name}__logits_last"], atol=ATOL, rtol=0)
    generated = golden_model_sdpa.generate_greedy(max_new_tokens=16, stop_token_ids=STOP_IDS, **inputs)
    assert generated == model_arrays[f"{name}__generated_ids"].tolist()


def test_left_padded_sample_equals_alone(golden_model, model_cases, model_arrays, lut):
    """Sample 0 of batch2_left_pad carries 295 pad tokens; alone it must give the same logits."""
    case = next(c for c in model_cases["cases"] if c["name"] == "batch2_left_pad")
    inputs = golden_case_inputs(case, model_arrays, lut)
    n_pad = case["samples"][0]["n_pad"]
    assert n_pad > 0
    alone = {
        "input_ids": inputs["input_ids"][:1, n_pad:],
        "attention_mask": inputs["attention_mask"][:1, n_pad:],
        "image_bounds": [inputs["image_bounds"][0] - n_pad],
        "pixel_values": inputs["pixel_values"][:1],
        "tgt_sizes": inputs["tgt_sizes"][:1],
    }
    with torch.no_grad():
        batched = golden_model(**inputs).logits[0, n_pad:]
        single = golden_model(**alone).logits[0]
    # Padding changes the shapes of every matmul and attention call, and so their float32 summation order: the
    # largest difference measured is 2.7e-6 (AVX512 AMD EPYC, 1 or 2 threads), 3.0e-6 (its AVX2 kernels), 1.35e-5
    # (AVX2 + MKL's compatible sgemm order; scripts/isa_matrix.sh) and 1.7e-5 (AMX Xeon), against logits up to 4.3;
    # a pad mask ignored moves them by 6.0. ATOL, the golden comparisons' float32 bound, sits 10x above the largest.
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=0)


def test_forward_with_images_is_deterministic_and_images_matter(golden_model, model_cases, model_arrays, lut):
    case = next(c for c in model_cases["cases"] if c["name"] == "single_small")
    inputs = golden_case_inputs(case, model_arrays, lut)
    with torch.no_grad():
        first = golden_model(**inputs).logits
        second = golden_model(**inputs).logits
        flipped = dict(inputs, pixel_values=[[inputs["pixel_values"][0][0].flip(-1)]])
        other = golden_model(**flipped).logits
    assert torch.equal(first, second)
    assert (first[0, -1] - other[0, -1]).abs().max() > 1e-2
