"""M² Transformer vs the authors' own outputs (fixtures made with aimagelab/meshed-memory-transformer, see the fixture
README): each public case's `checkpoint.pth` + `vocab.pkl` go through the converter with the case's overrides, the
directory is loaded with `from_pretrained`, and every fixture tensor is compared, in float64 against
`expected_fp64.safetensors` (1e-8) and in float32 against `expected.safetensors` (the case's recommended tolerances).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfcap.compat import CACHE_NAME
from hfcap.conversion.m2_transformer import convert
from hfcap.generation import reference_beam_search
from hfcap.models.m2_transformer import M2TransformerForConditionalGeneration

M2_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference" / "m2"
UNK, PAD, BOS, EOS = 0, 1, 2, 3
FP64_TOLERANCE = 1e-8
# case.json "recommended" -> "fp32_port_vs_expected"
FP32_TOLERANCES = {"logprobs": 1e-4, "encoder_output": 1e-5, "scores": 1e-4}
FP32_RTOL = 1e-5
MAX_LEN = 20  # the authors' beam search and greedy length


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["small", "small-b"])
def case(request, tmp_path_factory):
    case_dir = M2_FIXTURES / request.param
    spec = json.loads((case_dir / "case.json").read_text())
    num_heads = spec["constructor"]["MemoryAugmentedEncoder"]["h"]  # the one size the shapes cannot give
    output = convert(
        case_dir / "checkpoint.pth", case_dir / "vocab.pkl", tmp_path_factory.mktemp(request.param), num_heads=num_heads
    )
    return {
        "name": request.param,
        "spec": spec,
        "model": M2TransformerForConditionalGeneration.from_pretrained(output).eval(),
        "inputs": load_file(case_dir / "inputs.safetensors"),
        "expected": {
            torch.float64: load_file(case_dir / "expected_fp64.safetensors"),
            torch.float32: load_file(case_dir / "expected.safetensors"),
        },
    }


def assert_close(actual, expected, dtype, kind, message=""):
    """float64: 1e-8; float32: the case's recommended atol (plus rtol 1e-5 for log-probs and scores)."""
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, atol=FP64_TOLERANCE, rtol=0, msg=message or None)
    else:
        rtol = 0 if kind == "encoder_output" else FP32_RTOL
        torch.testing.assert_close(actual, expected, atol=FP32_TOLERANCES[kind], rtol=rtol, msg=message or None)


def up_to_first_eos(tokens):
    tokens = list(tokens)
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


@DTYPES
def test_teacher_forced_log_probs_encoder_output_and_loss(case, dtype):
    model = case["model"].to(dtype)
    expected = case["expected"][dtype]
    regions, captions = case["inputs"]["regions"].to(dtype), case["inputs"]["captions"]
    with torch.no_grad():
        encoded = model.get_encoder()(visual_features=regions)
        output = model(visual_features=regions, decoder_input_ids=captions, decoder_attention_mask=captions.ne(PAD))
        labels = captions[:, 1:].masked_fill(captions[:, 1:] == PAD, -100)
        loss = model(visual_features=regions, decoder_input_ids=captions[:, :-1], labels=labels).loss

    assert encoded.last_hidden_state.shape == expected["encoder_output"].shape  # (B, L=3, 50, d)
    assert_close(encoded.last_hidden_state, expected["encoder_output"], dtype, "encoder_output")
    # the authors' mask is computed on the normalised projection: all False, padded regions are attended to
    assert torch.equal(encoded.attention_mask.eq(0), expected["encoder_mask"][:, 0, 0])
    log_probs = output.logits.log_softmax(-1)
    assert_close(log_probs, expected["decoder_logprobs"], dtype, "logprobs")  # pad rows included: -log(V)
    assert_close(loss, expected["loss_xe"], dtype, "scores")


@DTYPES
def test_stateful_decoding_with_the_cache(case, dtype):
    """Token by token through the KV cache, as the authors' stateful `step` (running keys/values)."""
    model = case["model"].to(dtype)
    regions, captions = case["inputs"]["regions"].to(dtype), case["inputs"]["captions"]
    encoder_outputs = model.get_encoder()(visual_features=regions)
    cache, steps = None, []
    with torch.no_grad():
        for t in range(captions.shape[1]):
            output = model(
                encoder_outputs=encoder_outputs,
                decoder_input_ids=captions[:, t : t + 1],
                decoder_attention_mask=captions[:, : t + 1].ne(PAD),
                cache=cache,
                use_cache=True,
            )
            cache = output[CACHE_NAME]
            steps.append(output.logits.log_softmax(-1))
    assert_close(torch.cat(steps, 1), case["expected"][dtype]["decoder_logprobs_stateful"], dtype, "logprobs")


@DTYPES
@pytest.mark.parametrize("beam_size", [3, 5])
def test_reference_beam_search_reproduces_the_authors_beams(case, dtype, beam_size):
    model = case["model"].to(dtype)
    expected = case["expected"][dtype]
    regions = case["inputs"]["regions"].to(dtype)
    all_beams = model.generate(
        visual_features=regions,
        num_beams=beam_size,
        num_return_sequences=beam_size,
        max_new_tokens=MAX_LEN,
        custom_generate=reference_beam_search,
        return_dict_in_generate=True,
    )
    best = model.generate(
        visual_features=regions, num_beams=beam_size, max_new_tokens=MAX_LEN, custom_generate=reference_beam_search
    )
    expected_tokens = expected[f"beam{beam_size}_all_tokens"]  # (B, k, 20), sorted by final score
    for image in range(regions.shape[0]):
        for rank in range(beam_size):
            authors = expected_tokens[image, rank].tolist()
            caption = up_to_first_eos(authors)
            assert authors[len(caption) :] == [UNK] * (MAX_LEN - len(caption))  # finished beams extended with 0
            row = all_beams.sequences[image * beam_size + rank].tolist()
            assert row[0] == BOS
            assert row[1 : 1 + len(caption)] == caption, (image, rank)
            assert set(row[1 + len(caption) :]) <= {PAD}
        caption = up_to_first_eos(expected[f"beam{beam_size}_tokens"][image].tolist())
        assert best[image, 1 : 1 + len(caption)].tolist() == caption
    scores = all_beams.sequences_scores.view(-1, beam_size)
    assert_close(scores, expected[f"beam{beam_size}_all_scores"], dtype, "scores")


@DTYPES
def test_greedy_decoding(case, dtype):
    """HF greedy `generate` gives the authors' `CaptioningModel.test` up to `<eos>`; a cached argmax loop that keeps
    going after `<eos>` (as theirs does) reproduces all 20 tokens and log-prob rows."""
    model = case["model"].to(dtype)
    expected = case["expected"][dtype]
    regions = case["inputs"]["regions"].to(dtype)
    output = model.generate(
        visual_features=regions,
        num_beams=1,
        do_sample=False,
        max_new_tokens=MAX_LEN,
        return_dict_in_generate=True,
        output_logits=True,
    )
    # `generate` hands out its logits in float32 whatever the model's dtype: float32 tolerances
    step_log_probs = torch.stack(output.logits, 1).log_softmax(-1).to(dtype)
    for image, authors in enumerate(expected["greedy_tokens"].tolist()):
        caption = up_to_first_eos(authors)
        assert output.sequences[image, 1 : 1 + len(caption)].tolist() == caption
        before_eos = len(caption) - 1  # the authors zero the rows from the <eos> step on
        torch.testing.assert_close(
            step_log_probs[image, :before_eos],
            expected["greedy_logprobs"][image, :before_eos],
            atol=FP32_TOLERANCES["logprobs"],
            rtol=FP32_RTOL,
        )

    encoder_outputs = model.get_encoder()(visual_features=regions)
    tokens = torch.full((regions.shape[0], 1), BOS)
    cache, rows = None, []
    with torch.no_grad():
        for _ in range(MAX_LEN):
            step = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, -1:], cache=cache, use_cache=True)
            cache = step[CACHE_NAME]
            rows.append(step.logits[:, -1].log_softmax(-1))
            tokens = torch.cat([tokens, rows[-1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens[:, 1:], expected["greedy_tokens"])
    not_finished = (tokens[:, 1:] == EOS).cumsum(1).eq(0).unsqueeze(-1)
    assert_close(torch.stack(rows, 1) * not_finished, expected["greedy_logprobs"], dtype, "logprobs")


def test_variable_length_regions_with_masks_equal_the_authors_padding(case):
    """The raw per-image features (N_i rows, the first 50 kept as the authors' field does), padded only to the batch
    maximum and masked, give the fixture outputs: the converted model pads to 50 zero rows itself."""
    model = case["model"].to(torch.float64)
    inputs = case["inputs"]
    raw = [inputs[f"regions_raw_{i}"][:50].double() for i in range(len(inputs["num_regions"]))]
    longest = max(len(features) for features in raw)
    features = torch.zeros(len(raw), longest, raw[0].shape[1], dtype=torch.float64)
    mask = torch.zeros(len(raw), longest, dtype=torch.long)
    for i, rows in enumerate(raw):
        features[i, : len(rows)] = rows
        mask[i, : len(rows)] = 1
        features[i, len(rows) :] = 7.0  # masked rows are set to zero before encoding, whatever they hold
    captions = inputs["captions"]
    with torch.no_grad():
        output = model(
            visual_features=features,
            visual_attention_mask=mask,
            decoder_input_ids=captions,
            decoder_attention_mask=captions.ne(PAD),
        )
        alone = model(visual_features=raw[1][None], decoder_input_ids=captions[1:2])
    expected = case["expected"][torch.float64]
    assert_close(output.logits.log_softmax(-1), expected["decoder_logprobs"], torch.float64, "logprobs")
    assert_close(output.encoder_last_hidden_state, expected["encoder_output"], torch.float64, "encoder_output")
    real = captions[1].ne(PAD)
    assert_close(
        alone.logits[0, real].log_softmax(-1), expected["decoder_logprobs"][1, real], torch.float64, "logprobs"
    )
    with pytest.raises(ValueError, match="at most 50 visual positions"):
        model(visual_features=torch.zeros(1, 51, raw[0].shape[1], dtype=torch.float64), decoder_input_ids=captions)


def test_converted_model_has_the_authors_parameters(case):
    """Parameter count as in case.json (the frozen position table counted, as the authors' frozen nn.Embedding)."""
    model = case["model"]
    count = sum(parameter.numel() for parameter in model.parameters()) + model.decoder.position_table.numel()
    assert count == case["spec"]["checkpoint"]["num_parameters_excluding_running_buffers"]
    assert not any("position" in name for name, _ in model.named_parameters())  # frozen: a buffer
