"""Show-Attend-Tell vs the tutorial's own outputs (fixtures made with sgrvinod's original code, see the fixture README).

The hfcap model is built features-only from each case's constructor arguments and loaded with the tutorial decoder's
state dict (`decoder_state_dict.pth`, weights_only) under the same parameter names (`conftest.tutorial_sat_model`).
Conversion of the pickled
checkpoint itself is tested with the converter.
"""

import pytest
import torch
from conftest import SAT_FIXTURES, tutorial_sat_model
from safetensors.torch import load_file

from hfcap.generation import reference_beam_search

CASES = ["small", "small-b"]
BEAM_SIZES = [1, 3, 5]
# float32 tolerances recommended by case.json ("fp32_port_vs_expected"); float64 must agree to 1e-8.
FP32_TOLERANCES = {"logits": 5e-5, "alphas": 1e-6, "losses": 2e-5, "scores": 2e-5}
FP64_TOLERANCE = 1e-8


@pytest.fixture(scope="module", params=CASES)
def case(request):
    case_dir = SAT_FIXTURES / request.param
    inputs = load_file(case_dir / "inputs.safetensors")
    captions = inputs["encoded_captions"]  # <start> w... <end> <pad>...
    caption_lengths = inputs["caption_lengths"].squeeze(1)  # words + 2
    decode_lengths = caption_lengths - 1  # the tutorial decodes caplen - 1 steps
    steps = int(decode_lengths.max())
    labels = captions[:, 1 : steps + 1].clone()
    labels[torch.arange(steps) >= decode_lengths[:, None]] = -100
    return {
        "name": request.param,
        "model": tutorial_sat_model(request.param),
        "features": inputs["encoder_out"].flatten(1, 2),  # (B, 14, 14, D) -> (B, 196, D), row-major as the tutorial
        "decoder_input_ids": captions[:, :steps],
        "labels": labels,
        "decode_lengths": decode_lengths,
        "expected": {
            torch.float64: load_file(case_dir / "expected_fp64.safetensors"),
            torch.float32: load_file(case_dir / "expected.safetensors"),
        },
    }


def tolerance(dtype, kind):
    return FP64_TOLERANCE if dtype == torch.float64 else FP32_TOLERANCES[kind]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_teacher_forced_logits_alphas_and_losses(case, dtype):
    expected = case["expected"][dtype]
    model = case["model"].to(dtype)
    with torch.no_grad():
        output = model(visual_features=case["features"].to(dtype), labels=case["labels"], output_attentions=True)

    sort_ind = expected["sort_ind"]  # the tutorial reorders the batch by caption length
    assert torch.equal(case["decode_lengths"][sort_ind], expected["decode_lengths"])
    steps = case["labels"].shape[1]
    assert torch.equal(case["decoder_input_ids"][sort_ind], expected["encoded_captions_sorted"][:, :steps])
    real_steps = torch.arange(steps) < expected["decode_lengths"][:, None]
    logits = output.logits[sort_ind][real_steps]
    alphas = output.cross_attentions[0][:, 0][sort_ind][real_steps]
    torch.testing.assert_close(logits, expected["predictions"][real_steps], atol=tolerance(dtype, "logits"), rtol=0)
    torch.testing.assert_close(alphas, expected["alphas"][real_steps], atol=tolerance(dtype, "alphas"), rtol=0)
    assert output.cross_attentions[0].shape == (case["features"].shape[0], 1, steps, 196)
    for name, value in [
        ("loss_ce", output.loss_ce),
        ("loss_doubly_stochastic", output.loss_doubly_stochastic),
        ("loss", output.loss),
    ]:
        torch.testing.assert_close(value, expected[name], atol=tolerance(dtype, "losses"), rtol=0, msg=name)


def test_labels_alone_are_shifted_with_the_start_token(case):
    model = case["model"].to(torch.float64)
    features = case["features"].to(torch.float64)
    with torch.no_grad():
        from_labels = model(visual_features=features, labels=case["labels"]).logits
        explicit = model(visual_features=features, decoder_input_ids=case["decoder_input_ids"]).logits
    real_steps = case["labels"] != -100
    assert torch.equal(from_labels[real_steps], explicit[real_steps])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("beam_size", BEAM_SIZES)
def test_reference_beam_search_reproduces_caption_py(case, dtype, beam_size):
    expected = case["expected"][dtype]
    model = case["model"].to(dtype)
    output = model.generate(
        visual_features=case["features"].to(dtype),
        num_beams=beam_size,
        custom_generate=reference_beam_search,
        return_dict_in_generate=True,
        output_attentions=True,
    )
    pad = model.config.pad_token_id
    for image in range(case["features"].shape[0]):
        sequence = expected[f"beam{beam_size}_seq_{image}"]
        row = output.sequences[image]
        assert row[: len(sequence)].tolist() == sequence.tolist(), f"image {image}"
        assert (row[len(sequence) :] == pad).all()
        torch.testing.assert_close(
            output.sequences_scores[image],
            expected[f"beam{beam_size}_score_{image}"],
            atol=tolerance(dtype, "scores"),
            rtol=0,
        )
        # caption.py's alphas start with an all-ones placeholder for <start>; ours start at the first real token.
        expected_alphas = expected[f"beam{beam_size}_alphas_{image}"][1:].flatten(1)
        alphas = output.cross_attentions[0][image, 0, : len(sequence) - 1]
        torch.testing.assert_close(alphas, expected_alphas, atol=tolerance(dtype, "alphas"), rtol=0)


@pytest.mark.parametrize("beam_size", [3, 5])
def test_reference_beam_search_returns_every_completed_hypothesis(case, beam_size):
    """With num_return_sequences=k the k completed hypotheses come back best first (caption.py's complete_seqs)."""
    expected = case["expected"][torch.float64]
    model = case["model"].to(torch.float64)
    output = model.generate(
        visual_features=case["features"].to(torch.float64),
        num_beams=beam_size,
        num_return_sequences=beam_size,
        custom_generate=reference_beam_search,
        return_dict_in_generate=True,
    )
    for image in range(case["features"].shape[0]):
        complete = expected[f"beam{beam_size}_complete_seqs_{image}"]
        scores = expected[f"beam{beam_size}_complete_scores_{image}"]
        order = torch.sort(scores, descending=True, stable=True).indices
        rows = output.sequences[image * beam_size : (image + 1) * beam_size]
        for rank, index in enumerate(order.tolist()):
            tokens = complete[index][complete[index] >= 0]
            assert rows[rank, : len(tokens)].tolist() == tokens.tolist()
        torch.testing.assert_close(
            output.sequences_scores[image * beam_size : (image + 1) * beam_size], scores[order], atol=1e-8, rtol=0
        )
