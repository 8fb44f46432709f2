"""What is Show-Attend-Tell's own: the paper's equations and variants, the two parts of the loss (doubly stochastic
regulariser), the tutorial's initialisation, masked region features, the LSTM state as cache, hard attention with
REINFORCE, the backbone's timm keys and its errors. Tiny models only; the Hugging Face behaviour every architecture
shares is tested in test_models_common.py, fixture parity in test_show_attend_tell_parity.py."""

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F

from hfcap.compat import CACHE_NAME
from hfcap.models.show_attend_tell import (
    ShowAttendTellConfig,
    ShowAttendTellDecoderState,
    ShowAttendTellForConditionalGeneration,
)

PAD, BOS, EOS = 0, 1, 2
VOCAB = 23
GRID = 3  # N = 9 annotation vectors


def tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB,
        visual_feature_dim=16,
        attention_dim=10,
        embed_dim=8,
        d_model=12,
        encoder_grid_size=GRID,
        use_backbone=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
    )
    values.update(overrides)
    return ShowAttendTellConfig(**values)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ShowAttendTellForConditionalGeneration(tiny_config(**overrides)).eval()


def pixel_config(**overrides):
    """resnet10t trunk (512 channels); 64 px images give a 2x2 map, pooled to 3x3 like the tutorial's 8 -> 14."""
    values = {"use_backbone": True, "backbone": "resnet10t", "visual_feature_dim": 512}
    return tiny_config(**{**values, **overrides})


def features(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, GRID * GRID, 16, generator=generator)


def make_labels():
    return torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, -100], [10, EOS, -100, -100]])


# ----------------------------------------------------------------------------------------------------------------------
# Forward, loss, equations


def test_forward_shapes_and_loss_parts():
    model = tiny_model()
    labels = make_labels()
    output = model(visual_features=features(), labels=labels, output_attentions=True, output_hidden_states=True)
    assert output.logits.shape == (3, 4, VOCAB)
    assert output.cross_attentions[0].shape == (3, 1, 4, GRID * GRID)
    assert [hidden.shape for hidden in output.decoder_hidden_states] == [(3, 4, 8), (3, 4, 12)]  # E y, then h_t
    assert output.encoder_last_hidden_state.shape == (3, GRID * GRID, 16)
    assert isinstance(output[CACHE_NAME], ShowAttendTellDecoderState)
    assert output[CACHE_NAME].get_seq_length() == 4
    torch.testing.assert_close(output.cross_attentions[0].sum(-1), torch.ones(3, 1, 4))
    from_tuple = model(encoder_outputs=model.encoder(visual_features=features(), return_dict=False), labels=labels)
    assert torch.equal(from_tuple.logits, output.logits)

    token_mask = labels != -100
    log_probs = output.logits.log_softmax(-1)
    expected_ce = -(log_probs.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * token_mask).sum() / token_mask.sum()
    per_position = output.cross_attentions[0][:, 0].masked_fill(~token_mask[..., None], 0).sum(1)
    expected_doubly_stochastic = ((1 - per_position) ** 2).mean()
    torch.testing.assert_close(output.loss_ce, expected_ce)
    torch.testing.assert_close(output.loss_doubly_stochastic, expected_doubly_stochastic)
    torch.testing.assert_close(output.loss, expected_ce + expected_doubly_stochastic)


def test_doubly_stochastic_weight_and_label_smoothing():
    plain = tiny_model()
    variant = tiny_model(doubly_stochastic_weight=0.25)
    variant.load_state_dict(plain.state_dict())
    labels = make_labels()
    reference = plain(visual_features=features(), labels=labels)
    output = variant(visual_features=features(), labels=labels, label_smoothing=0.1)  # a trainer's choice, per call
    smoothed = F.cross_entropy(reference.logits.reshape(-1, VOCAB), labels.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(output.loss_ce, smoothed)
    torch.testing.assert_close(output.loss, smoothed + 0.25 * reference.loss_doubly_stochastic)


def test_default_initialisation_is_the_tutorials():
    model = tiny_model(vocab_size=4000, embed_dim=64)
    for weight in (model.decoder.embedding.weight, model.decoder.fc.weight):
        assert weight.abs().max() <= 0.1 and weight.abs().max() > 0.09  # U(-0.1, 0.1)
    assert torch.equal(model.decoder.fc.bias, torch.zeros(4000))


def one_step_by_hand(model, feats, token):
    """The paper's equations for the first step, written out independently of the modeling code."""
    decoder = model.decoder
    config = model.config
    mean = feats.mean(1)
    h0, c0 = decoder.init_h(mean), decoder.init_c(mean)
    activation = torch.relu if config.attention_activation == "relu" else torch.tanh
    e = decoder.attention.full_att(
        activation(decoder.attention.encoder_att(feats) + decoder.attention.decoder_att(h0)[:, None])
    ).squeeze(-1)  # Eq. 4
    alpha = e.softmax(-1)  # Eq. 5
    beta = torch.sigmoid(decoder.f_beta(h0))  # §4.2.1
    z = beta * torch.einsum("bn,bnd->bd", alpha, feats)  # Eq. 6
    y = decoder.embedding(token)
    gates = decoder.decode_step.weight_ih @ torch.cat([y, z], 1).T + decoder.decode_step.weight_hh @ h0.T
    gates = gates.T + decoder.decode_step.bias_ih + decoder.decode_step.bias_hh
    i, f, g, o = gates.chunk(4, dim=1)  # Eq. 1, PyTorch's gate order
    c1 = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)  # Eq. 2
    h1 = torch.sigmoid(o) * torch.tanh(c1)  # Eq. 3
    if config.deep_output:
        return decoder.fc(torch.tanh(y + decoder.deep_output_h(h1) + decoder.deep_output_z(z))), alpha  # Eq. 7
    return decoder.fc(h1), alpha


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"attention_activation": "tanh"},
        {"gate": "scalar"},
        {"deep_output": True},
        {"attention_activation": "tanh", "gate": "scalar", "deep_output": True},
    ],
    ids=["tutorial", "tanh-attention", "scalar-gate", "deep-output", "paper"],
)
def test_first_step_follows_the_papers_equations(variant):
    model = tiny_model(**variant)
    feats = features()
    token = torch.full((3,), BOS)
    with torch.no_grad():
        output = model(visual_features=feats, decoder_input_ids=token[:, None], output_attentions=True)
        logits, alpha = one_step_by_hand(model, feats, token)
    torch.testing.assert_close(output.logits[:, 0], logits)
    torch.testing.assert_close(output.cross_attentions[0][:, 0, 0], alpha)
    assert model.decoder.f_beta.out_features == (1 if variant.get("gate") == "scalar" else 16)


def test_padded_region_features_equal_the_unpadded_ones():
    model = tiny_model()
    feats = features(batch=1)
    padded = torch.cat([feats[:, :6], torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    labels = torch.tensor([[5, 6, EOS]])
    with torch.no_grad():
        reference = model(visual_features=feats[:, :6], labels=labels, output_attentions=True)
        output = model(visual_features=padded, visual_attention_mask=mask, labels=labels, output_attentions=True)
    torch.testing.assert_close(output.logits, reference.logits)
    torch.testing.assert_close(output.cross_attentions[0][..., :6], reference.cross_attentions[0])
    assert torch.equal(output.cross_attentions[0][..., 6:], torch.zeros(1, 1, 3, 3))
    torch.testing.assert_close(output.loss, reference.loss)


def test_lstm_state_continues_the_sequence_and_follows_batch_operations():
    """The cache is the LSTM state (`ShowAttendTellDecoderState`, which ExpansionNet v2 copies): forward does not
    modify the state passed in; `batch_repeat_interleave` / `batch_select_indices` (what generate calls) keep rows
    consistent; it is a pytree node."""
    model = tiny_model()
    feats = features()
    ids = torch.tensor([[BOS, 5, 6, 7]] * 3)
    with torch.no_grad():
        full = model(visual_features=feats, decoder_input_ids=ids)
        prefix = model(visual_features=feats, decoder_input_ids=ids[:, :2])
        model(visual_features=feats, decoder_input_ids=ids[:, 2:], cache=prefix[CACHE_NAME])
    state = prefix[CACHE_NAME]
    assert isinstance(state, ShowAttendTellDecoderState) and state.get_seq_length() == 2  # not modified
    assert set(state.tensors) == {"hidden", "cell", "projected_features"}
    state.batch_repeat_interleave(2)  # e.g. two continuations per image
    state.batch_select_indices(torch.tensor([5, 0]))  # image 2, image 0
    with torch.no_grad():
        picked = model(visual_features=feats[[2, 0]], decoder_input_ids=ids[[2, 0], 2:], cache=state).logits
    torch.testing.assert_close(picked, full.logits[[2, 0], 2:], atol=1e-6, rtol=0)
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    assert len(leaves) == 3 and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert rebuilt.get_seq_length() == 2 and torch.equal(rebuilt["cell"], state["cell"])


# ----------------------------------------------------------------------------------------------------------------------
# Backbone


def test_backbone_keys_are_timms():
    model = ShowAttendTellForConditionalGeneration(pixel_config())
    keys = set(model.state_dict())
    assert {"encoder.backbone.conv1.0.weight", "encoder.backbone.layer4.0.conv2.weight"} <= keys
    assert not any(key.startswith("encoder.backbone.fc") for key in keys)


# ----------------------------------------------------------------------------------------------------------------------
# Hard attention


def hard_model(**overrides):
    return tiny_model(attention_type="hard", dropout=0.0, **overrides)


def test_hard_attention_training_step_and_moving_average_baseline():
    model = hard_model().train()
    labels = make_labels()
    model.decoder.reinforce_baseline.fill_(-3.0)
    output = model(visual_features=features(), labels=labels, sample_attention=True, output_attentions=True)
    assert output.attention_locations.shape == (3, 4)
    alphas = output.cross_attentions[0][:, 0]
    assert (alphas.gather(-1, output.attention_locations[..., None]) > 0).all()
    torch.testing.assert_close(output.loss, output.loss_ce + output.loss_doubly_stochastic)  # surrogate adds 0
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.decoder.attention.encoder_att.weight.grad.abs().sum() > 0

    token_mask = labels != -100
    log_likelihood = (output.logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * token_mask)
    expected_baseline = 0.9 * -3.0 + 0.1 * log_likelihood.sum(1).mean()
    torch.testing.assert_close(model.decoder.reinforce_baseline, expected_baseline.detach())
    assert "decoder.reinforce_baseline" in model.state_dict()


def reinforce_case(baseline, reinforce_weight=1.0, entropy_weight=0.0):
    """One decoding step, so alpha_1 depends only on h_0 and log p(s|a) can be recomputed without the samples."""
    model = hard_model(reinforce_weight=reinforce_weight, entropy_weight=entropy_weight, doubly_stochastic_weight=0.0)
    model.train()
    model.decoder.reinforce_baseline.fill_(baseline)
    feats = features(batch=4)
    labels = torch.full((4, 1), EOS)
    torch.manual_seed(11)
    output = model(visual_features=feats, labels=labels, sample_attention=True, output_attentions=True)
    return model, feats, labels, output


def first_alpha(model, feats):
    start = torch.full((feats.shape[0], 1), BOS)
    output = model(visual_features=feats, decoder_input_ids=start, sample_attention=False, output_attentions=True)
    return output.cross_attentions[0][:, 0, 0]


def log_p_locations(model, feats, locations):
    with torch.no_grad():
        alpha = first_alpha(model, feats)
    return alpha.gather(-1, locations).log().squeeze(-1)


@pytest.mark.parametrize("baseline", [-1e3, 1e3], ids=["reward-above-baseline", "reward-below-baseline"])
def test_reinforce_moves_log_p_of_the_sampled_locations_with_the_sign_of_log_p_minus_b(baseline):
    model, feats, labels, output = reinforce_case(baseline)
    log_likelihood = output.logits.log_softmax(-1).gather(-1, labels[..., None])[:, 0, 0]
    assert ((log_likelihood - baseline > 0) == (baseline < 0)).all()
    before = log_p_locations(model, feats, output.attention_locations)
    output.loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 1e-5 * parameter.grad
    after = log_p_locations(model, feats, output.attention_locations)
    if baseline < 0:  # log p(y|s) - b > 0: make the sampled locations more likely
        assert (after > before).all()
    else:
        assert (after < before).all()


def test_reinforce_gradient_equals_the_papers_estimator():
    """For the attention parameters the cross-entropy has no gradient under sampling, so theirs is exactly
    -(lambda_r (log p(y|s) - b) d log p(s) + lambda_e dH) / n_tokens."""
    model, feats, labels, output = reinforce_case(baseline=-2.0, reinforce_weight=0.1, entropy_weight=0.002)
    log_likelihood = output.logits.log_softmax(-1).gather(-1, labels[..., None])[:, 0, 0].detach()
    output.loss.backward()
    attention = list(model.decoder.attention.parameters())
    got = [parameter.grad.clone() for parameter in attention]

    alpha = first_alpha(model, feats)
    log_p = alpha.gather(-1, output.attention_locations).log().squeeze(-1)
    entropy = -(alpha * alpha.log()).sum(-1)
    estimator = (0.1 * (log_likelihood + 2.0) * log_p + 0.002 * entropy).sum() / 4
    expected = torch.autograd.grad(-estimator, attention, allow_unused=True)
    for got_grad, expected_grad in zip(got, expected):
        if expected_grad is None:  # full_att.bias: softmax is shift invariant
            torch.testing.assert_close(got_grad, torch.zeros_like(got_grad), atol=1e-7, rtol=0)
        else:
            torch.testing.assert_close(got_grad, expected_grad)


def test_hard_attention_sampling_is_drawn_once_per_minibatch():
    model = hard_model().train()
    torch.manual_seed(0)
    sampled = [model(visual_features=features(), labels=make_labels()).attention_locations for _ in range(12)]
    assert any(locations is None for locations in sampled) and any(locations is not None for locations in sampled)
    assert all(locations is None or locations.shape == (3, 4) for locations in sampled)
    never = hard_model(hard_attention_sampling_probability=0.0).train()
    assert never(visual_features=features(), labels=make_labels()).attention_locations is None


def test_hard_attention_inference_uses_the_expected_context_unless_sampling_is_asked():
    soft = tiny_model()
    hard = hard_model()
    hard.load_state_dict(soft.state_dict(), strict=False)  # all but the REINFORCE baseline
    feats = features()
    expected = soft.generate(visual_features=feats, num_beams=2, max_new_tokens=6)
    assert torch.equal(hard.generate(visual_features=feats, num_beams=2, max_new_tokens=6), expected)
    torch.manual_seed(3)
    sampled = hard(visual_features=feats, decoder_input_ids=torch.full((3, 5), BOS), sample_attention=True)
    assert sampled.attention_locations.shape == (3, 5)
    generated = hard.generate(visual_features=feats, num_beams=1, max_new_tokens=6, sample_attention=True)
    assert generated.shape[0] == 3
    hard.config.sample_attention_at_inference = True
    assert hard(visual_features=feats, decoder_input_ids=torch.full((3, 2), BOS)).attention_locations.shape == (3, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_give_clear_errors():
    """Show-Attend-Tell's own; the errors every architecture gives are in test_models_common.py."""
    model = tiny_model()
    labels = make_labels()
    with pytest.raises(ValueError, match=r"`visual_features` must have shape \(batch, num_positions, 16\)"):
        model(visual_features=torch.randn(3, 9, 15), labels=labels)
    with pytest.raises(ValueError, match="no backbone"):
        model(pixel_values=torch.randn(3, 3, 64, 64), labels=labels)
    with pytest.raises(ValueError, match="`visual_attention_mask` must be a tensor of shape"):
        model(visual_features=features(), visual_attention_mask=torch.ones(3, 8), labels=labels)
    with pytest.raises(ValueError, match="`decoder_input_ids`"):
        model(visual_features=features())
    with pytest.raises(ValueError, match="same shape"):
        model(visual_features=features(), labels=labels, decoder_input_ids=labels[:, :2].clamp_min(0))
    with pytest.raises(ValueError, match="hard-attention"):
        model(visual_features=features(), labels=labels, sample_attention=True)
    with pytest.raises(ValueError, match="exactly one of"):
        model.generate(pixel_values=torch.randn(3, 3, 64, 64), visual_features=features())


def test_bad_pixels_and_backbones_give_clear_errors(monkeypatch, tmp_path):
    model = ShowAttendTellForConditionalGeneration(pixel_config())
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(batch, 3, height, width\)"):
        model(pixel_values=torch.randn(2, 1, 64, 64), labels=make_labels()[:2])
    with pytest.raises(ValueError, match="has 512 channels but `visual_feature_dim=256`"):
        ShowAttendTellForConditionalGeneration(pixel_config(visual_feature_dim=256))
    with pytest.raises(ValueError, match="not a timm model"):
        ShowAttendTellForConditionalGeneration(pixel_config(backbone="resnet_that_does_not_exist"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="use_pretrained_backbone"):
        ShowAttendTellForConditionalGeneration(pixel_config(use_pretrained_backbone=True))


def test_bad_config_values_are_rejected():
    with pytest.raises(Exception, match="gate"):
        tiny_config(gate="matrix")
    with pytest.raises(Exception, match="dropout"):
        tiny_config(dropout=1.5)
