"""`hfcap.generation.reference_beam_search`: its wiring through `generate(custom_generate=...)` and the tutorial beam
search's behaviour beyond the fixture images (greedy equivalence, raw scores, best-first hypotheses, never-ending
beams, errors). Uses the tutorial-trained tiny decoder of the sat/small fixture, so captions end as a real
captioner's do."""

import pytest
import torch
from conftest import SAT_FIXTURES, tutorial_sat_model
from safetensors.torch import load_file

from hfcap.generation import reference_beam_search
from hfcap.models.show_attend_tell import ShowAttendTellForConditionalGeneration

CASE = SAT_FIXTURES / "small"


@pytest.fixture(scope="module")
def tutorial():
    model = tutorial_sat_model(CASE.name).to(torch.float64)
    fixture_features = load_file(CASE / "inputs.safetensors")["encoder_out"].flatten(1, 2).to(torch.float64)
    generator = torch.Generator().manual_seed(0)
    # fixture images and new ones (their features mixed and perturbed), so the search meets unseen inputs
    mixed = 0.5 * (fixture_features + fixture_features.roll(1, 0))
    noise = torch.rand(mixed.shape, generator=generator, dtype=torch.float64)
    features = torch.cat([fixture_features, mixed + 0.2 * noise])
    return model, features


def reference(model, features, **kwargs):
    return model.generate(visual_features=features, custom_generate=reference_beam_search, **kwargs)


def rescore(model, tokens, features):
    """Raw sum of teacher-forced log-probabilities of every token after <start>, up to and including the first <end>."""
    with torch.no_grad():
        logits = model(visual_features=features, decoder_input_ids=tokens[:, :-1]).logits
    targets = tokens[:, 1:]
    is_end = targets == model.config.eos_token_id
    token_log_probs = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (token_log_probs * ((is_end.cumsum(1) - is_end.long()) == 0)).sum(1)


def test_dispatcher_needs_a_model_with_a_reference_search():
    with pytest.raises(TypeError, match="has no reference"):
        reference_beam_search(torch.nn.Linear(2, 2), torch.zeros(1, 1, dtype=torch.long))


def test_beam_of_one_is_greedy_decoding(tutorial):
    model, features = tutorial
    ours = reference(model, features, num_beams=1, max_new_tokens=20)
    greedy = model.generate(visual_features=features, num_beams=1, max_new_tokens=20)
    assert ours.shape == greedy.shape
    assert torch.equal(ours, greedy)  # both pad with <pad> after <end>


def test_scores_are_raw_log_probability_sums_and_best_first(tutorial):
    model, features = tutorial
    output = reference(model, features, num_beams=3, num_return_sequences=3, return_dict_in_generate=True)
    assert output.sequences.shape[0] == 3 * features.shape[0]
    rescored = rescore(model, output.sequences, features.repeat_interleave(3, dim=0))
    torch.testing.assert_close(output.sequences_scores, rescored, atol=1e-10, rtol=0)
    per_image = output.sequences_scores.view(-1, 3)
    assert (per_image[:, :-1] >= per_image[:, 1:]).all()
    best = reference(model, features, num_beams=3)
    assert torch.equal(best, output.sequences[::3, : best.shape[1]])


def test_batched_images_are_searched_independently(tutorial):
    model, features = tutorial
    together = reference(model, features, num_beams=5, return_dict_in_generate=True)
    for image in range(features.shape[0]):
        alone = reference(model, features[image : image + 1], num_beams=5, return_dict_in_generate=True)
        length = alone.sequences.shape[1]
        assert torch.equal(alone.sequences[0], together.sequences[image, :length])
        assert (together.sequences[image, length:] == model.config.pad_token_id).all()
        torch.testing.assert_close(alone.sequences_scores, together.sequences_scores[image : image + 1])


def never_ending(model):
    """The same decoder with <end> made impossible, as a weak model whose beams never finish (tutorial issue #142)."""
    stuck = ShowAttendTellForConditionalGeneration(model.config).to(torch.float64).eval()
    stuck.load_state_dict(model.state_dict())
    with torch.no_grad():
        stuck.decoder.fc.bias[model.config.eos_token_id] = -1e4
    return stuck


def test_never_ending_beams_return_their_best_partial_hypotheses(tutorial):
    model, features = tutorial
    stuck = never_ending(model)
    output = reference(
        stuck, features[:2], num_beams=3, num_return_sequences=3, max_new_tokens=6, return_dict_in_generate=True
    )
    assert output.sequences.shape == (6, 7)  # <start> + max_new_tokens
    assert not (output.sequences == model.config.eos_token_id).any()
    rescored = rescore(stuck, output.sequences, features[:2].repeat_interleave(3, 0))
    torch.testing.assert_close(output.sequences_scores, rescored, atol=1e-10, rtol=0)
    assert (output.sequences_scores.view(2, 3)[:, :-1] >= output.sequences_scores.view(2, 3)[:, 1:]).all()
    greedy = stuck.generate(visual_features=features[:2], num_beams=1, max_new_tokens=6)
    assert torch.equal(reference(stuck, features[:2], num_beams=1, max_new_tokens=6), greedy)


def test_default_length_limit_is_caption_pys_51_steps(tutorial):
    model, features = tutorial
    stuck = never_ending(model)
    assert stuck.generation_config.max_new_tokens == 51
    assert reference(stuck, features[:1], num_beams=2).shape == (1, 52)


def test_attentions_follow_the_returned_sequences(tutorial):
    model, features = tutorial
    output = reference(model, features, num_beams=3, return_dict_in_generate=True, output_attentions=True)
    alphas = output.cross_attentions[0][:, 0]
    assert alphas.shape == (features.shape[0], output.sequences.shape[1] - 1, 196)
    with torch.no_grad():
        forced = model(
            visual_features=features, decoder_input_ids=output.sequences[:, :-1], output_attentions=True
        ).cross_attentions[0][:, 0]
    produced = output.sequences[:, 1:] != model.config.pad_token_id
    torch.testing.assert_close(alphas[produced], forced[produced], atol=1e-12, rtol=0)
    assert (alphas[~produced] == 0).all()
    assert reference(model, features, num_beams=3, return_dict_in_generate=True).cross_attentions is None


def test_reference_search_errors(tutorial):
    model, features = tutorial
    start = model.config.decoder_start_token_id
    with pytest.raises(ValueError, match="takes no decoder prompt"):
        reference(model, features[:1], num_beams=2, decoder_input_ids=torch.tensor([[start, 5]]))
    with pytest.raises(ValueError, match="NoRepeatNGramLogitsProcessor"):
        reference(model, features[:1], num_beams=2, no_repeat_ngram_size=2)
