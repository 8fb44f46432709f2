"""What is M²'s own, on tiny random configs: its outputs (levels, meshed gates, memory slots), the loss, masked
variable-N region features and the authors' padding behaviour as a switch, their decoding defaults and beam search,
row-major grid features, the authors' initialisation and M²-specific errors. The Hugging Face behaviour every
architecture shares is tested in test_models_common.py, fixture parity in test_m2_transformer_parity.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import EncoderDecoderCache

from hfcap.compat import CACHE_NAME
from hfcap.generation import reference_beam_search
from hfcap.models.m2_transformer import (
    M2TransformerConfig,
    M2TransformerForConditionalGeneration,
    remove_consecutive_duplicate_words,
)

UNK, PAD, BOS, EOS = 0, 1, 2, 3
VOCAB = 20
FEATURES = 12  # D
D_MODEL, HEADS, HEAD_DIM, SLOTS, LEVELS, DECODER_LAYERS = 16, 2, 8, 3, 3, 2
NUM_REGIONS = (6, 4, 2)  # N per image; padded to 6 in a batch
CAPTIONS = torch.tensor([[5, 6, EOS, -100, -100, -100, -100], [7, 8, 9, 10, EOS, -100, -100],
                         [11, 12, 13, 14, 15, 16, EOS]])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB, d_model=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, d_ff=32, num_memory_slots=SLOTS,
        num_encoder_layers=LEVELS, num_decoder_layers=DECODER_LAYERS, max_position_embeddings=20,
        visual_feature_dim=FEATURES, use_backbone=False, dropout=0.0,
    )
    return M2TransformerConfig(**{**values, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M2TransformerForConditionalGeneration(tiny_config(**overrides)).eval()


def pixel_model(seed=0, **overrides):
    """timm's `test_resnet` (96 channels, stride 32): 64 px images give a 2x2 grid, N = 4."""
    return tiny_model(seed, use_backbone=True, backbone="test_resnet", visual_feature_dim=96, **overrides)


def region_features(seed=1):
    """`(features (3, 6, D), mask (3, 6))`: N = 6, 4, 2 real regions; padded rows hold noise (they are masked)."""
    features = torch.rand(len(NUM_REGIONS), max(NUM_REGIONS), FEATURES, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(NUM_REGIONS)) < torch.tensor(NUM_REGIONS)[:, None]).long()
    return features, mask


@pytest.fixture(scope="module")
def captioner():
    """A tiny model trained to give three captions of different lengths (so beams end at different steps)."""
    model = tiny_model().train()
    features, mask = region_features()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss = model(visual_features=features, visual_attention_mask=mask, labels=CAPTIONS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    greedy = model.generate(visual_features=features, visual_attention_mask=mask, num_beams=1, max_new_tokens=8)
    for row, caption in zip(greedy, CAPTIONS):
        words = caption[caption != -100].tolist()
        assert row[1 : 1 + len(words)].tolist() == words
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Forward


def test_forward_outputs():
    model = tiny_model()
    features, mask = region_features()
    with torch.no_grad():
        output = model(
            visual_features=features, visual_attention_mask=mask, labels=CAPTIONS, output_attentions=True,
            output_hidden_states=True,
        )
    batch, steps, num_positions = 3, CAPTIONS.shape[1], max(NUM_REGIONS)
    assert output.logits.shape == (batch, steps, VOCAB)
    assert isinstance(output[CACHE_NAME], EncoderDecoderCache)
    assert output.encoder_last_hidden_state.shape == (batch, LEVELS, num_positions, D_MODEL)
    assert len(output.encoder_hidden_states) == LEVELS + 1
    assert len(output.decoder_hidden_states) == DECODER_LAYERS + 1
    for cross in output.cross_attentions:  # the shared cross-attention over the N positions, for every level
        assert cross.shape == (batch, LEVELS, HEADS, steps, num_positions)
        torch.testing.assert_close(cross.sum(-1), torch.ones(batch, LEVELS, HEADS, steps))
        assert torch.all(cross[mask.eq(0)[:, None, None, None, :].expand_as(cross)] == 0)  # padding never attended
    for gates in output.meshed_gates:
        assert gates.shape == (batch, LEVELS, steps, D_MODEL)
        assert torch.all((gates > 0) & (gates < 1))
    for self_attention in output.decoder_attentions:
        assert self_attention.shape == (batch, HEADS, steps, steps)
        assert torch.all(self_attention.triu(1) == 0)  # causal
    for encoder_attention in output.encoder_attentions:  # N positions, then the m memory slots
        assert encoder_attention.shape == (batch, HEADS, num_positions, num_positions + SLOTS)
        assert torch.all(encoder_attention[..., :num_positions][mask.eq(0)[:, None, None, :].expand(
            -1, HEADS, num_positions, -1)] == 0)
        assert torch.all(encoder_attention[..., num_positions:] > 0)  # memory slots are never masked


def test_labels_are_shifted_and_the_loss_is_token_cross_entropy():
    model = tiny_model()
    features, mask = region_features()
    with torch.no_grad():
        output = model(visual_features=features, visual_attention_mask=mask, labels=CAPTIONS)
        inputs = torch.cat([torch.full((3, 1), BOS), CAPTIONS[:, :-1].masked_fill(CAPTIONS[:, :-1] == -100, PAD)], 1)
        explicit = model(visual_features=features, visual_attention_mask=mask, decoder_input_ids=inputs)
        smoothed = model(visual_features=features, visual_attention_mask=mask, labels=CAPTIONS, label_smoothing=0.1)
    assert torch.equal(output.logits, explicit.logits)
    real = CAPTIONS != -100
    token_losses = -explicit.logits.log_softmax(-1).gather(-1, CAPTIONS.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(output.loss, token_losses[real].mean())
    expected = F.cross_entropy(explicit.logits[real], CAPTIONS[real], label_smoothing=0.1)
    torch.testing.assert_close(smoothed.loss, expected)


def test_padded_region_features_equal_the_unpadded_ones():
    """`mask_padded_regions=True` (default): padding is never attended, whatever the padded rows hold."""
    model = tiny_model()
    features, mask = region_features()
    with torch.no_grad():
        batch = model(visual_features=features, visual_attention_mask=mask, labels=CAPTIONS).logits
        for image, num_regions in enumerate(NUM_REGIONS):
            unpadded = features[image : image + 1, :num_regions]
            single = model(visual_features=unpadded, labels=CAPTIONS[image : image + 1])
            torch.testing.assert_close(single.logits, batch[image : image + 1], atol=1e-5, rtol=0)


def test_authors_padding_pads_to_a_fixed_size_and_attends_to_it():
    """`mask_padded_regions=False` + `pad_regions_to` (what the converter sets): masked rows become zero rows, every
    image is padded to `pad_regions_to`, and those rows are attended to, as in the authors' code."""
    model = tiny_model(mask_padded_regions=False, pad_regions_to=8)
    features, mask = region_features()
    with torch.no_grad():
        batch = model(visual_features=features, visual_attention_mask=mask, labels=CAPTIONS, output_attentions=True)
        for image, num_regions in enumerate(NUM_REGIONS):
            unpadded = features[image : image + 1, :num_regions]
            single = model(visual_features=unpadded, labels=CAPTIONS[image : image + 1])
            torch.testing.assert_close(single.logits, batch.logits[image : image + 1], atol=1e-5, rtol=0)
        unmasked = model(visual_features=features, labels=CAPTIONS).logits  # the padded noise rows now count
    assert batch.encoder_last_hidden_state.shape == (3, LEVELS, 8, D_MODEL)
    assert torch.all(batch.cross_attentions[0][..., 6:] > 0)  # padding rows are attended
    assert not torch.allclose(unmasked[1:], batch.logits[1:])


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def test_generation_defaults_are_the_authors(captioner):
    assert (captioner.generation_config.num_beams, captioner.generation_config.max_new_tokens) == (5, 20)
    features, mask = region_features()
    assert captioner.generate(visual_features=features, visual_attention_mask=mask).shape[0] == 3


def test_reference_beam_search_scores_are_raw_log_probability_sums(captioner):
    features, mask = region_features()
    output = captioner.generate(
        visual_features=features, visual_attention_mask=mask, num_beams=3, num_return_sequences=3, max_new_tokens=8,
        custom_generate=reference_beam_search, return_dict_in_generate=True, output_attentions=True,
    )
    sequences = output.sequences
    assert sequences.shape[0] == 9 and torch.all(sequences[:, 0] == BOS)
    scores = output.sequences_scores.view(3, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
    with torch.no_grad():
        rescored = captioner(
            visual_features=features.repeat_interleave(3, 0), visual_attention_mask=mask.repeat_interleave(3, 0),
            decoder_input_ids=sequences[:, :-1],
        ).logits.log_softmax(-1)
    targets = sequences[:, 1:]
    real = targets != PAD  # cut after <eos>
    token_log_probs = rescored.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(output.sequences_scores, (token_log_probs * real).sum(1), atol=1e-5, rtol=0)
    for layer_attention in output.cross_attentions:
        assert layer_attention.shape == (9, LEVELS, HEADS, sequences.shape[1] - 1, max(NUM_REGIONS))
        expected_sums = real[:, None, None, :].expand(-1, LEVELS, HEADS, -1).float()  # zero after <eos>
        torch.testing.assert_close(layer_attention.sum(-1), expected_sums)
    best = captioner.generate(visual_features=features, visual_attention_mask=mask, num_beams=3, max_new_tokens=8,
                              custom_generate=reference_beam_search)
    assert torch.equal(best, sequences[::3, : best.shape[1]])


# ----------------------------------------------------------------------------------------------------------------------
# Backbone


def test_grid_features_are_row_major():
    model = pixel_model()
    pixel_values = torch.randn(2, 3, 64, 64)
    grid = model.get_image_features(pixel_values)
    feature_map = model.backbone(pixel_values)[-1]  # (2, 96, 2, 2)
    assert grid.shape == (2, 4, 96)
    assert torch.equal(grid[:, 1], feature_map[:, :, 0, 1])  # row-major: position 1 = row 0, column 1


def test_channels_last_backbones_are_flattened_row_major():
    model = tiny_model(
        use_backbone=True, backbone="swin_tiny_patch4_window7_224", visual_feature_dim=32,
        backbone_kwargs={"embed_dim": 4, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    )
    pixel_values = torch.randn(1, 3, 224, 224)
    feature_map = model.backbone(pixel_values)[-1]  # NHWC (1, 7, 7, 32)
    grid = model.get_image_features(pixel_values)
    assert grid.shape == (1, 49, 32)
    assert torch.equal(grid[:, 8], feature_map[:, 1, 1])


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation, helpers


def test_initialisation_is_the_authors():
    model = tiny_model()
    attention = model.encoder.layers[0].mhatt.attention
    for linear in (attention.fc_q, attention.fc_k, attention.fc_v, attention.fc_o, model.decoder.layers[0].fc_alpha[1]):
        assert torch.all(linear.bias == 0)
    assert torch.any(model.encoder.fc.bias != 0) and torch.any(model.encoder.layers[0].pwff.fc1.bias != 0)
    for name, parameter in model.named_parameters():  # xavier_uniform_ on every matrix, memory slots included
        if parameter.dim() > 1:
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(parameter)
            assert parameter.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5, name
            assert parameter.std() > 0.3 * (2 / (fan_in + fan_out)) ** 0.5, name
    assert model.decoder.word_emb.weight[PAD].abs().sum() > 0  # padding_idx only freezes the row's gradient
    table = model.decoder.position_table
    assert not any("position" in name for name, _ in model.named_parameters())  # frozen
    assert torch.all(table[0] == 0)
    torch.testing.assert_close(table[3, :2], torch.tensor([math.sin(3.0), math.cos(3.0)]))
    random_table = tiny_model(position_embedding_type="frozen_random").decoder.position_table
    assert torch.all(random_table[0] != 0) and random_table.abs().max() <= (6 / (21 + D_MODEL)) ** 0.5


def test_remove_consecutive_duplicate_words():
    assert remove_consecutive_duplicate_words("a man man riding a a horse horse") == "a man riding a horse"
    assert remove_consecutive_duplicate_words("a a") == "a"
    assert remove_consecutive_duplicate_words("") == ""


# ----------------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_give_clear_errors():
    """M²'s own; the errors every architecture gives are in test_models_common.py."""
    model = tiny_model()
    features, mask = region_features()
    ids = torch.tensor([[BOS, 5]] * 3)
    with pytest.raises(ValueError, match=r"`visual_features` must have shape \(batch, num_positions, 12\)"):
        model(visual_features=features[..., :5], decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"`visual_attention_mask` must be a tensor of shape \(3, 6\)"):
        model(visual_features=features, visual_attention_mask=mask[:, :4], decoder_input_ids=ids)
    with pytest.raises(ValueError, match="no backbone .* pass `visual_features`"):
        model(pixel_values=torch.zeros(3, 3, 64, 64), decoder_input_ids=ids)
    with pytest.raises(ValueError, match="at most `max_position_embeddings=20` tokens"):
        model(visual_features=features, decoder_input_ids=torch.full((3, 21), 5))
    with pytest.raises(ValueError, match="takes no decoder prompt"):
        model.generate(visual_features=features, input_ids=torch.tensor([[BOS, 5]] * 3),
                       custom_generate=reference_beam_search)
    with pytest.raises(ValueError, match="at most 4 visual positions"):
        tiny_model(pad_regions_to=4)(visual_features=features, decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(batch, 3, height, width\)"):
        pixel_model()(pixel_values=torch.zeros(3, 1, 64, 64), decoder_input_ids=ids)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="has 96 channels but `visual_feature_dim=12`"):
        tiny_model(use_backbone=True, backbone="test_resnet")
    with pytest.raises(ValueError, match="not a timm model name"):
        tiny_model(use_backbone=True, backbone="no_such_net")
    for field, value in [("num_heads", 0), ("num_memory_slots", -1), ("dropout", 1.5), ("pad_regions_to", 0)]:
        with pytest.raises(StrictDataclassError, match=f"`{field}` must"):
            tiny_config(**{field: value})
    with pytest.raises(StrictDataclassError, match="position_embedding_type"):
        tiny_config(position_embedding_type="learned")
