"""What is ExpansionNet v2's own, on a tiny random config: the exact incremental decoder cache (its state, exported
as an input, and its static form), the authors' beam search, outputs and loss, the five dropouts, any timm backbone
as row-major tokens, and ExpansionNet-specific errors. The Hugging Face behaviour every architecture shares is tested in
test_models_common.py, fixture parity in test_expansionnet_v2_parity.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

from hfcap.compat import CACHE_NAME
from hfcap.generation import reference_beam_search
from hfcap.models.expansionnet_v2 import (
    ExpansionNetV2Config,
    ExpansionNetV2DecoderState,
    ExpansionNetV2ForConditionalGeneration,
    ExpansionNetV2StaticDecoderState,
)
from hfcap.models.expansionnet_v2.modeling_expansionnet_v2 import DECODER_CACHE_NAMES

# Alphabetical like the authors' vocabularies: EOS=1, PAD=2, SOS=3, UNK=4.
VOCAB = ['"', "EOS", "PAD", "SOS", "UNK", "a", "beach", "dog", "horse", "man", "on", "riding", "the"]
EOS, PAD, SOS = 1, 2, 3
IMAGE_SIZE = 32


def tiny_config(**overrides):
    """Swin 32 px, patch 4, window 4, widths 8/16 (stage 1 has a shifted block), 16 tokens of width 16; body d=16."""
    settings = {
        "backbone": "swin_tiny_patch4_window7_224",
        "backbone_kwargs": {
            "img_size": IMAGE_SIZE, "embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4
        },
        "visual_feature_dim": 16,
        "vocab_size": len(VOCAB),
        "d_model": 16,
        "num_heads": 2,
        "d_ff": 32,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "static_expansion_groups": [2, 4],
        "num_dynamic_expansions": 3,
        "max_position_embeddings": 12,
        "pad_token_id": PAD,
        "bos_token_id": SOS,
        "eos_token_id": EOS,
        "decoder_start_token_id": SOS,
    }
    return ExpansionNetV2Config(**{**settings, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ExpansionNetV2ForConditionalGeneration(tiny_config(**overrides)).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def random_tokens(batch_size, length, seed=2):
    tokens = torch.randint(0, len(VOCAB), (batch_size, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = SOS
    return tokens


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cached_steps_give_the_full_forwards_logits(model, pixel_values, dtype):
    """§3: the dynamic expansion is exactly causal, so prefill + one token at a time equals one full pass."""
    model = tiny_model().to(dtype)
    tokens = random_tokens(2, 10)
    with torch.no_grad():
        full = model(pixel_values=pixel_values.to(dtype), decoder_input_ids=tokens).logits
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values.to(dtype))
        output = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, :4], use_cache=True)
        steps = [output.logits]
        for position in range(4, tokens.shape[1]):
            next_token = tokens[:, position : position + 1]
            output = model(encoder_outputs=encoder_outputs, decoder_input_ids=next_token, cache=output[CACHE_NAME])
            steps.append(output.logits)
    state = output[CACHE_NAME]
    assert isinstance(state, ExpansionNetV2DecoderState) and state.get_seq_length() == tokens.shape[1]
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=atol, rtol=0)


STATIC_SEARCHES = {
    "greedy": {},
    "beam": {"num_beams": 3, "num_return_sequences": 2, "output_scores": True},
    "sampling": {"do_sample": True, "top_k": 0, "output_scores": True},
}


@pytest.mark.parametrize("search", list(STATIC_SEARCHES))
def test_static_cache_decodes_as_the_dynamic_one(search):
    """`cache_implementation="static"` (preallocated buffers written in place, fixed step shapes) gives the dynamic
    cache's tokens and scores in float64, with padded visual features and a left-padded decoder prompt; a second
    call of the same capacity reuses the state."""
    model = tiny_model().double()
    features = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    visual_mask = torch.ones(3, 5, dtype=torch.long)
    visual_mask[1, 3:] = 0
    prompt = torch.tensor([[PAD, SOS, 12], [SOS, 5, 6], [PAD, PAD, SOS]])
    settings = dict(visual_features=features, visual_attention_mask=visual_mask, decoder_input_ids=prompt,
                    decoder_attention_mask=(prompt != PAD).long(), min_new_tokens=6, max_new_tokens=6,
                    return_dict_in_generate=True, **STATIC_SEARCHES[search])
    torch.manual_seed(0)
    dynamic = model.generate(**settings)
    outputs, states = [], []
    for _ in range(2):
        torch.manual_seed(0)
        outputs.append(model.generate(**settings, cache_implementation="static"))
        states.append(model._static_decoder_state)
    state = states[0]
    assert isinstance(state, ExpansionNetV2StaticDecoderState) and state.get_seq_length() == 3 + 5
    assert state["0.keys"].shape[1] == state.capacity == 3 + 5  # the tokens fed back: the last one is not
    assert states[1] is state
    for static in outputs:
        assert torch.equal(static.sequences, dynamic.sequences)
        for static_scores, dynamic_scores in zip(static.scores or (), dynamic.scores or ()):
            torch.testing.assert_close(static_scores, dynamic_scores, atol=1e-12, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_reference_beam_search_on_the_static_cache(num_beams):
    """The authors' search on the static state (SOS on every beam row, no batch change afterwards) gives the same
    sequences, scores and token log-probabilities as on the growing cache, float64."""
    model = tiny_model().double()
    features = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    settings = dict(visual_features=features, num_beams=num_beams, max_new_tokens=8, return_dict_in_generate=True,
                    custom_generate=reference_beam_search, num_return_sequences=num_beams)
    dynamic = model.generate(**settings)
    static = model.generate(**settings, cache_implementation="static")
    assert isinstance(model._static_decoder_state, ExpansionNetV2StaticDecoderState)
    assert model._static_decoder_state["0.keys"].shape[0] == 3 * num_beams
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(static.sequences_scores, dynamic.sequences_scores, atol=1e-12, rtol=0)
    torch.testing.assert_close(static.token_log_probs, dynamic.token_log_probs, atol=1e-12, rtol=0)


def test_static_cache_steps_give_the_full_forwards_logits(model, pixel_values):
    """The static state's prefill and in-place steps give the one-pass logits; it refuses what it cannot hold."""
    tokens = random_tokens(2, 7)
    state = ExpansionNetV2StaticDecoderState(capacity=7)
    with torch.no_grad():
        full = model(pixel_values=pixel_values, decoder_input_ids=tokens).logits
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values)
        steps = [model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, :3], cache=state).logits]
        for position in range(3, 7):
            output = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, position:][:, :1], cache=state)
            assert output[CACHE_NAME] is state and state.get_seq_length() == position + 1
            steps.append(output.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="position 7: the static cache holds 7 positions"):
            model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, :1], cache=state)
        state.seq_length = 3
        with pytest.raises(ValueError, match="one token per row at a time, got 2 tokens"):
            model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, :2], cache=state)
        with pytest.raises(ValueError, match="prompt has 7 tokens, more than the static cache's capacity of 6"):
            model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens, cache=ExpansionNetV2StaticDecoderState(6))


def test_static_cache_survives_inference_mode_and_copies(pixel_values):
    """Buffers made under `torch.inference_mode` are replaced in a later plain call (they could not be written
    there), and a deep copy of the model starts with an empty state."""
    model = tiny_model()
    settings = dict(pixel_values=pixel_values, max_new_tokens=5, min_new_tokens=5, cache_implementation="static")
    with torch.inference_mode():
        first = model.generate(**settings)
    assert model._static_decoder_state["0.keys"].is_inference()
    second = model.generate(**settings)
    assert torch.equal(first, second) and not model._static_decoder_state["0.keys"].is_inference()
    copied = copy.deepcopy(model)
    assert copied._static_decoder_state.tensors == {} and torch.equal(copied.generate(**settings), first)


def test_reference_beam_search_batches_images_independently(model, pixel_values):
    """Their search runs all images at once (K beams each): an image's beams never meet another image's."""
    settings = {"num_beams": 3, "max_new_tokens": 8, "custom_generate": reference_beam_search}
    batch = model.generate(pixel_values=pixel_values, **settings)
    for image in range(pixel_values.shape[0]):
        single = model.generate(pixel_values=pixel_values[image : image + 1], **settings)
        assert batch[image, : single.shape[1]].tolist() == single[0].tolist()
        assert (batch[image, single.shape[1] :] == PAD).all()
    features = model.get_image_features(pixel_values)
    assert torch.equal(model.generate(visual_features=features, **settings), batch)


def test_visual_padding_is_ignored(model, pixel_values):
    """Padded `visual_features` rows are masked out of the static expansion's forward pass and the cross-attention."""
    features = model.get_image_features(pixel_values)
    padded = torch.cat([features, torch.randn(2, 3, 16)], dim=1)
    mask = torch.cat([torch.ones(2, 16), torch.zeros(2, 3)], dim=1).long()
    tokens = random_tokens(2, 5)
    with torch.no_grad():
        plain = model(visual_features=features, decoder_input_ids=tokens).logits
        masked = model(visual_features=padded, visual_attention_mask=mask, decoder_input_ids=tokens).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=0)


def test_reference_beam_search_output(model, pixel_values):
    output = model.generate(
        pixel_values=pixel_values,
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=6,
        custom_generate=reference_beam_search,
        return_dict_in_generate=True,
    )
    assert output.sequences.shape[0] == 4 and (output.sequences[:, 0] == SOS).all()
    assert output.sequences.shape[1] <= 7  # SOS + at most max_new_tokens
    assert (output.sequences_scores.view(2, 2)[:, 0] >= output.sequences_scores.view(2, 2)[:, 1]).all()
    # their score: summed log-probs over the length counting SOS and EOS (the whole row when cut without EOS)
    for row, sequence in enumerate(output.sequences.tolist()):
        length = sequence.index(EOS) + 1 if EOS in sequence else len(sequence)
        score = output.token_log_probs[row, :length].sum() / length
        torch.testing.assert_close(score, output.sequences_scores[row])
        assert (output.token_log_probs[row, length:] == 0).all()


def test_generation_defaults_are_the_authors(model):
    """Beam 5 and SOS + the new tokens within the position table (their max_seq_len): 12 rows -> 11 new tokens;
    `generate` decodes at most 12 (the last token is never fed back)."""
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (5, 11)
    assert model.max_new_tokens_limit == 12
    assert tiny_model(max_position_embeddings=74).generation_config.max_new_tokens == 73


def test_outputs_and_loss(model, pixel_values):
    labels = random_tokens(2, 5)[:, 1:]
    labels[1, 2:] = -100
    with torch.no_grad():
        output = model(pixel_values=pixel_values, labels=labels, output_attentions=True, output_hidden_states=True)
        smoothed = model(pixel_values=pixel_values, labels=labels, label_smoothing=0.1).loss
    assert output.logits.shape == (2, 4, len(VOCAB))
    assert len(output.cross_attentions) == 2 and output.cross_attentions[0].shape == (2, 2, 4, 16)
    torch.testing.assert_close(output.cross_attentions[0].sum(-1), torch.ones(2, 2, 4))
    assert len(output.decoder_hidden_states) == 3 and output.decoder_hidden_states[0].shape == (2, 4, 16)
    assert len(output.encoder_hidden_states) == 3 and output.encoder_last_hidden_state.shape == (2, 16, 16)
    flat_logits, flat_labels = output.logits.reshape(-1, len(VOCAB)), labels.reshape(-1)
    torch.testing.assert_close(output.loss, F.cross_entropy(flat_logits, flat_labels, ignore_index=-100))
    expected_smoothed = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, expected_smoothed)
    # labels alone are shifted right behind SOS
    shifted = torch.cat([torch.full((2, 1), SOS), labels[:, :-1].masked_fill(labels[:, :-1] == -100, PAD)], dim=1)
    with torch.no_grad():
        explicit = model(pixel_values=pixel_values, decoder_input_ids=shifted).logits
    assert torch.equal(explicit, output.logits)


def test_state_is_a_pytree_and_forward_exports(model, pixel_values):
    tokens = random_tokens(2, 4)
    with torch.no_grad():
        prefix = model(pixel_values=pixel_values, decoder_input_ids=tokens[:, :3], use_cache=True)
        encoder_outputs = (prefix.encoder_last_hidden_state,)
        expected = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, 3:], cache=prefix[CACHE_NAME])
    leaves, spec = torch.utils._pytree.tree_flatten(prefix[CACHE_NAME])
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    assert torch.utils._pytree.tree_unflatten(leaves, spec).get_seq_length() == 3

    class Step(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, encoder_hidden_states, decoder_input_ids, cache):
            encoder_outputs = (encoder_hidden_states,)
            output = self.model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids, cache=cache)
            return output.logits, output[CACHE_NAME]

    # the state as an input too: the incremental step alone (test_models_common exports the whole forward)
    inputs = (prefix.encoder_last_hidden_state, tokens[:, 3:], prefix[CACHE_NAME])
    exported = torch.export.export(Step(model), inputs)
    logits, state = exported.module()(*inputs)
    torch.testing.assert_close(logits, expected.logits)
    assert isinstance(state, ExpansionNetV2DecoderState) and state.get_seq_length() == 4


def test_state_holds_every_layers_cache_and_follows_batch_operations(model, pixel_values):
    with torch.no_grad():
        state = model(pixel_values=pixel_values, decoder_input_ids=random_tokens(2, 3), use_cache=True)[CACHE_NAME]
    layer_names = {f"{layer}.{name}" for layer in range(2) for name in DECODER_CACHE_NAMES}
    assert set(state.tensors) == layer_names | {"key_mask", "position_offset"}
    assert state["1.queries"].shape == (2, 3 * 3, 16)  # E L rows of width d
    keys = state["0.keys"].clone()
    state.batch_repeat_interleave(2)
    assert state["1.queries"].shape[0] == 4 and state["key_mask"].shape == (4, 3)
    state.reorder_cache(torch.tensor([3, 0]))
    assert torch.equal(state["0.keys"], keys[[1, 0]])


START = torch.tensor([[SOS]])
FEATURES = torch.randn(1, 16, 16)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"visual_features": torch.randn(1, 16, 12), "decoder_input_ids": START}, r"\(batch, num_positions, 16\)"),
        ({"pixel_values": torch.randn(1, 3, 64, 64), "decoder_input_ids": START}, "must be 32x32 px for backbone"),
        ({"visual_features": FEATURES, "decoder_input_ids": torch.full((1, 13), SOS)}, "13 tokens long"),
    ],
)
def test_bad_inputs_are_clear_errors(model, inputs, message):
    """ExpansionNet's own; the errors every architecture gives are in test_models_common.py."""
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 3}, "`d_model=16` must be divisible by `num_heads=3`"),
        ({"static_expansion_groups": []}, "`static_expansion_groups` must be a non-empty list"),
        ({"dropout_dec": 1.5}, r"`dropout_dec` must lie in \[0, 1\]"),
    ],
)
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"visual_feature_dim": 24}, "outputs 16 features per token .* set `visual_feature_dim=16`"),
        ({"backbone": "no_such_model"}, "not a timm model name"),
    ],
)
def test_backbones_that_do_not_fit_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ExpansionNetV2ForConditionalGeneration(tiny_config(**overrides))


def test_any_timm_backbone_gives_row_major_tokens():
    """A CNN's NCHW map is flattened row-major like Swin's NHWC one."""
    model = tiny_model(backbone="test_resnet", backbone_kwargs=None, visual_feature_dim=96)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.get_image_features(pixels)
        feature_map = model.backbone.forward_features(pixels)  # (B, 96, 2, 2)
    assert features.shape == (2, 4, 96)
    assert torch.equal(features[:, 1], feature_map[:, :, 0, 1]) and torch.equal(features[:, 2], feature_map[:, :, 1, 0])
    assert model.generate(pixel_values=pixels, max_new_tokens=3).shape[0] == 2


def test_training_step_reaches_every_parameter(pixel_values):
    """A teacher-forced loss back-propagates into every parameter, the backbone's included; the five dropouts act
    in training mode only."""
    knobs = ("dropout_enc", "dropout_dec", "dropout_enc_input", "dropout_dec_input", "dropout_other")
    model = tiny_model(**dict.fromkeys(knobs, 0.3)).train()
    labels = random_tokens(2, 6)[:, 1:]
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    with torch.no_grad():
        first, second = (model(pixel_values=pixel_values, labels=labels).logits for _ in range(2))
        model.eval()
        third, fourth = (model(pixel_values=pixel_values, labels=labels).logits for _ in range(2))
    assert not torch.equal(first, second) and torch.equal(third, fourth)
