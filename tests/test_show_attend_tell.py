"""Show-Attend-Tell as a Hugging Face model: generation with the LSTM state as cache, save/load, Auto classes, the paper
variants, hard attention with REINFORCE, and clear errors for bad inputs. Tiny models only (fixture parity is in
test_show_attend_tell_parity.py)."""

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

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
        encoder_dim=16,
        attention_dim=10,
        embed_dim=8,
        decoder_dim=12,
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
    values = {"use_backbone": True, "backbone": "resnet10t", "encoder_dim": 512, "image_size": 64}
    return tiny_config(**{**values, **overrides})


def features(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, GRID * GRID, 16, generator=generator)


def make_labels():
    return torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, -100], [10, EOS, -100, -100]])


@pytest.fixture(scope="module")
def registered_auto_classes():
    AutoConfig.register("show_attend_tell", ShowAttendTellConfig, exist_ok=True)
    AutoModel.register(ShowAttendTellConfig, ShowAttendTellForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(ShowAttendTellConfig, ShowAttendTellForConditionalGeneration, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Forward, loss, equations


def test_forward_shapes_and_loss_parts():
    model = tiny_model()
    labels = make_labels()
    output = model(visual_features=features(), labels=labels, output_attentions=True, output_hidden_states=True)
    assert output.logits.shape == (3, 4, VOCAB)
    assert output.cross_attentions[0].shape == (3, 4, GRID * GRID)
    assert output.decoder_hidden_states[0].shape == (3, 4, 12)
    assert output.encoder_last_hidden_state.shape == (3, GRID * GRID, 16)
    assert isinstance(output[CACHE_NAME], ShowAttendTellDecoderState)
    assert output[CACHE_NAME].get_seq_length() == 4
    torch.testing.assert_close(output.cross_attentions[0].sum(-1), torch.ones(3, 4))
    from_tuple = model(encoder_outputs=model.encoder(visual_features=features(), return_dict=False), labels=labels)
    assert torch.equal(from_tuple.logits, output.logits)

    token_mask = labels != -100
    log_probs = output.logits.log_softmax(-1)
    expected_ce = -(log_probs.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * token_mask).sum() / token_mask.sum()
    per_position = output.cross_attentions[0].masked_fill(~token_mask[..., None], 0).sum(1)
    expected_doubly_stochastic = ((1 - per_position) ** 2).mean()
    torch.testing.assert_close(output.loss_ce, expected_ce)
    torch.testing.assert_close(output.loss_doubly_stochastic, expected_doubly_stochastic)
    torch.testing.assert_close(output.loss, expected_ce + expected_doubly_stochastic)


def test_doubly_stochastic_weight_and_label_smoothing():
    plain = tiny_model()
    variant = tiny_model(doubly_stochastic_weight=0.25, label_smoothing=0.1)
    variant.load_state_dict(plain.state_dict())
    labels = make_labels()
    reference = plain(visual_features=features(), labels=labels)
    output = variant(visual_features=features(), labels=labels)
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
    torch.testing.assert_close(output.cross_attentions[0][:, 0], alpha)
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
    assert torch.equal(output.cross_attentions[0][..., 6:], torch.zeros(1, 3, 3))
    torch.testing.assert_close(output.loss, reference.loss)


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
def test_forward_from_a_state_continues_the_sequence(cache_argument):
    """Both names of the cache argument (transformers >= 5.25 passes `cache`, older releases `past_key_values`)."""
    model = tiny_model()
    feats = features()
    ids = torch.tensor([[BOS, 5, 6, 7]] * 3)
    with torch.no_grad():
        full = model(visual_features=feats, decoder_input_ids=ids)
        prefix = model(visual_features=feats, decoder_input_ids=ids[:, :2])
        rest = model(visual_features=feats, decoder_input_ids=ids[:, 2:], **{cache_argument: prefix[CACHE_NAME]})
    assert torch.equal(torch.cat([prefix.logits, rest.logits], 1), full.logits)
    assert prefix[CACHE_NAME].get_seq_length() == 2  # the state passed in is not modified

    state = prefix[CACHE_NAME]
    state.batch_repeat_interleave(2)  # e.g. two continuations per image
    state.batch_select_indices(torch.tensor([5, 0]))  # image 2, image 0
    with torch.no_grad():
        picked = model(
            visual_features=feats[[2, 0]], decoder_input_ids=ids[[2, 0], 2:], **{cache_argument: state}
        ).logits
    torch.testing.assert_close(picked, full.logits[[2, 0], 2:], atol=1e-6, rtol=0)


def test_batch_equals_single_images(captioner):
    model = captioner
    feats = features()
    labels = make_labels()
    with torch.no_grad():
        batch = model(visual_features=feats, labels=labels).logits
        for image in range(3):
            single = model(visual_features=feats[image : image + 1], labels=labels[image : image + 1]).logits
            torch.testing.assert_close(single, batch[image : image + 1], atol=1e-5, rtol=0)
    for kwargs in ({"num_beams": 1}, {"num_beams": 3}):
        together = model.generate(visual_features=feats, max_new_tokens=8, **kwargs)
        for image in range(3):
            alone = model.generate(visual_features=feats[image : image + 1], max_new_tokens=8, **kwargs)
            assert alone[0].tolist() == together[image, : alone.shape[1]].tolist()
            # transformers fills finished beams with <end> when pad_token_id is 0 (`pad_token_id or eos_token_id`)
            assert set(together[image, alone.shape[1] :].tolist()) <= {PAD, EOS}


# ----------------------------------------------------------------------------------------------------------------------
# Generation


@pytest.fixture(scope="module")
def captioner():
    """A tiny model trained to reproduce three captions of different lengths (so beams end at different steps)."""
    model = tiny_model(dropout=0.0).train()
    captions = torch.tensor(
        [[5, 6, EOS, -100, -100, -100, -100], [7, 8, 9, 10, EOS, -100, -100], [11, 12, 13, 14, 15, 16, EOS]]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(100):
        loss = model(visual_features=features(), labels=captions).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    greedy = model.generate(visual_features=features(), num_beams=1, max_new_tokens=8)
    assert [row[1 : 1 + (caption != -100).sum()].tolist() for row, caption in zip(greedy, captions)] == [
        caption[caption != -100].tolist() for caption in captions
    ]
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 1},
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_beams": 1, "num_return_sequences": 2, "top_k": 0},
    ],
    ids=["greedy", "beam", "beam-2-returns", "sampling"],
)
def test_cached_generation_equals_uncached(captioner, kwargs):
    model = captioner
    results = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        results.append(
            model.generate(
                visual_features=features(),
                max_new_tokens=8,
                use_cache=use_cache,
                return_dict_in_generate=True,
                output_scores=True,
                **kwargs,
            )
        )
    cached, uncached = results
    expected_rows = 3 * kwargs.get("num_return_sequences", 1)
    assert cached.sequences.shape[0] == expected_rows
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_scores, uncached_scores in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(cached_scores, uncached_scores)
    if kwargs["num_beams"] > 1:
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


def test_beam_search_scores_are_raw_log_probability_sums(captioner):
    """generation_config has caption.py's defaults: 5 beams, no length penalty, at most 51 new tokens."""
    model = captioner
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (5, 51)
    output = model.generate(
        visual_features=features(), max_new_tokens=8, return_dict_in_generate=True, output_scores=True
    )
    with torch.no_grad():
        rescored = model(visual_features=features(), decoder_input_ids=output.sequences[:, :-1])
    targets = output.sequences[:, 1:]
    token_log_probs = rescored.logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    ended = (targets == EOS).cumsum(1)
    real = (ended == 0) | ((ended == 1) & (targets == EOS))  # tokens up to and including the first <end>
    torch.testing.assert_close(output.sequences_scores, (token_log_probs * real).sum(1), atol=1e-5, rtol=0)


def test_generate_attentions_and_scores(captioner):
    model = captioner
    output = model.generate(
        visual_features=features(),
        num_beams=2,
        max_new_tokens=5,
        return_dict_in_generate=True,
        output_attentions=True,
        output_scores=True,
    )
    # beam search may run steps beyond the longest returned sequence (to rule out better hypotheses)
    assert len(output.cross_attentions) == len(output.scores) >= output.sequences.shape[1] - 1
    for step in output.cross_attentions:
        assert step[0].shape == (3 * 2, 1, GRID * GRID)
        torch.testing.assert_close(step[0].sum(-1), torch.ones(6, 1))


def test_generation_from_pixels_runs_the_backbone_once_per_image():
    torch.manual_seed(0)
    model = ShowAttendTellForConditionalGeneration(pixel_config()).eval()
    calls = []
    model.encoder.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    pixel_values = torch.randn(2, 3, 64, 64)
    sequences = model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=4)
    assert calls == [2]  # encoded once, then expanded for the beams
    features_out = model.encoder(pixel_values=pixel_values).last_hidden_state
    assert features_out.shape == (2, GRID * GRID, 512)
    assert torch.equal(model.generate(visual_features=features_out, num_beams=3, max_new_tokens=4), sequences)


def test_left_padded_prompts_equal_unpadded_prompts(captioner):
    model = captioner
    feats = features(batch=2)
    prompts = torch.tensor([[PAD, BOS, 5], [BOS, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    for use_cache in (True, False):
        batched = model.generate(
            visual_features=feats,
            input_ids=prompts,
            attention_mask=mask,
            num_beams=1,
            max_new_tokens=4,
            use_cache=use_cache,
        )
        first = model.generate(visual_features=feats[:1], input_ids=prompts[:1, 1:], num_beams=1, max_new_tokens=4)
        assert batched[0, 1 : 1 + first.shape[1]].tolist() == first[0].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Save / load / Auto classes / backbone


def test_save_load_round_trip_through_auto_classes(tmp_path, registered_auto_classes):
    torch.manual_seed(0)
    model = ShowAttendTellForConditionalGeneration(pixel_config(trainable_backbone_layers=3)).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    before = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=5)
    model.save_pretrained(tmp_path)

    for auto_class in (AutoModel, AutoModelForImageTextToText):
        loaded = auto_class.from_pretrained(tmp_path)
        assert type(loaded) is ShowAttendTellForConditionalGeneration
        assert loaded.generation_config.num_beams == 5 and loaded.generation_config.length_penalty == 0.0
        assert torch.equal(loaded.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=5), before)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    loaded.train()
    frozen = {name for name, p in loaded.encoder.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, p in model.encoder.backbone.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize(
    ("trainable", "first_trainable"), [(0, None), (3, "layer2"), (5, "conv1")], ids=["frozen", "tutorial", "all"]
)
def test_trainable_backbone_layers_counts_resnet_stages_from_the_end(trainable, first_trainable):
    model = ShowAttendTellForConditionalGeneration(pixel_config(trainable_backbone_layers=trainable))
    stages = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    trainable_modules = {
        name.split(".")[0] for name, p in model.encoder.backbone.named_parameters() if p.requires_grad
    }
    expected = set(stages[stages.index(first_trainable) :]) if first_trainable else set()
    assert trainable_modules == expected
    assert all(p.requires_grad for p in model.decoder.parameters())


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
    alphas = output.cross_attentions[0]
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
    return output.cross_attentions[0][:, 0]


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
    model = tiny_model()
    labels = make_labels()
    with pytest.raises(ValueError, match="exactly one of `pixel_values`"):
        model(labels=labels)
    with pytest.raises(ValueError, match="exactly one of `pixel_values`"):
        model(pixel_values=torch.randn(3, 3, 64, 64), visual_features=features(), labels=labels)
    with pytest.raises(ValueError, match=r"`visual_features` must have shape \(batch, num_positions, 16\)"):
        model(visual_features=torch.randn(3, 9, 15), labels=labels)
    with pytest.raises(ValueError, match="no backbone"):
        model(pixel_values=torch.randn(3, 3, 64, 64), labels=labels)
    with pytest.raises(ValueError, match="`visual_attention_mask` must have shape"):
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
    with pytest.raises(ValueError, match="has 512 channels but `encoder_dim=256`"):
        ShowAttendTellForConditionalGeneration(pixel_config(encoder_dim=256))
    with pytest.raises(ValueError, match="not a timm model"):
        ShowAttendTellForConditionalGeneration(pixel_config(backbone="resnet_that_does_not_exist"))
    with pytest.raises(ValueError, match="only 5 feature stages"):
        ShowAttendTellForConditionalGeneration(pixel_config(trainable_backbone_layers=6))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="use_pretrained_backbone"):
        ShowAttendTellForConditionalGeneration(pixel_config(use_pretrained_backbone=True))


def test_bad_config_values_are_rejected():
    with pytest.raises(Exception, match="gate"):
        tiny_config(gate="matrix")
    with pytest.raises(Exception, match="dropout"):
        tiny_config(dropout=1.5)
