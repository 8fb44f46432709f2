"""SCST: baselines, loss normalisations and sign, the CIDEr-D reward's EOS and df modes, and scst_step on a tiny SAT."""

import math

import numpy as np
import pytest
import torch
from conftest import TRAIN_CAPTIONS, tiny_sat

from hfcap.generation import eos_mask
from hfcap.metrics import CiderD
from hfcap.training.scst import (
    ScstReward,
    compute_advantages,
    scst_loss,
    scst_step,
    sequence_log_probs,
)


# ---------------------------------------------------------------- baselines


def test_mean_of_others_advantages():
    # b_i = mean of the other two: [2.5, 2, 1.5] and [1.5, 1.5, 0].
    advantages = compute_advantages([[1, 2, 3], [0, 0, 3]], "mean_of_others")
    np.testing.assert_allclose(advantages, [[-1.5, 0, 1.5], [-1.5, -1.5, 3]])


def test_greedy_advantages():
    advantages = compute_advantages([[1, 2, 3], [0, 0, 3]], "greedy", greedy_rewards=[0.5, 3])
    np.testing.assert_allclose(advantages, [[0.5, 1.5, 2.5], [-3, -3, 0]])


def test_beam_mean_advantages():
    # b = mean of the beams: 2 and 1.
    advantages = compute_advantages([[1, 2, 3], [0, 0, 3]], "beam_mean")
    np.testing.assert_allclose(advantages, [[-1, 0, 1], [-1, -1, 2]])


def test_baseline_errors():
    with pytest.raises(ValueError, match="greedy_rewards"):
        compute_advantages([[1, 2]], "greedy")
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_advantages([[1], [2]], "mean_of_others")
    with pytest.raises(ValueError, match="baseline must be one of"):
        compute_advantages([[1, 2]], "average")


# ---------------------------------------------------------------- loss


def test_loss_normalisations_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([2.0, -1.0])
    # -A·logp·m: row 0 = [2, 4, 0] (sum 6), row 1 = [-0.5, -0.5, -4] (sum -5); 5 tokens.
    assert scst_loss(logprobs, mask, advantages, "token").item() == pytest.approx(1 / 5)
    assert scst_loss(logprobs, mask, advantages, "sequence").item() == pytest.approx(0.5)
    assert scst_loss(logprobs, mask, advantages, "max_length", max_length=20).item() == pytest.approx(0.5 / 20)
    with pytest.raises(ValueError, match="max_length"):
        scst_loss(logprobs, mask, advantages, "max_length")


def test_eos_mask_includes_first_eos_only():
    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    mask, finished = eos_mask(tokens, eos_token_id=2)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_loss_sign_moves_sampled_sequence_probability(advantage):
    model, processor = tiny_sat(use_backbone=False)
    model.train()
    features = torch.randn(1, 4, 96)
    encoder_outputs = model.get_encoder()(visual_features=features)
    words = processor.tokenizer.convert_tokens_to_ids(["a", "red", "circle"])
    sequence = torch.tensor([[model.config.bos_token_id, *words, model.config.eos_token_id]])
    mask = torch.ones(1, 4)

    def log_p():
        return sequence_log_probs(model, encoder_outputs, sequence).sum()

    before = log_p().item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scst_loss(sequence_log_probs(model, encoder_outputs, sequence), mask, torch.tensor([advantage])).backward()
    optimizer.step()
    after = log_p().item()
    assert (after - before) * advantage > 1e-4


def test_sequence_log_probs_match_generate_scores():
    model, _ = tiny_sat(use_backbone=False)
    model.eval()
    features = torch.randn(2, 4, 96)
    torch.manual_seed(1)
    out = model.generate(visual_features=features, do_sample=True, top_k=0, num_beams=1, max_new_tokens=6,
                         num_return_sequences=3, return_dict_in_generate=True, output_scores=True)
    steps = torch.stack(out.scores, 1).log_softmax(-1)  # (6, T, V)
    expected = steps.gather(-1, out.sequences[:, 1:, None]).squeeze(-1)
    encoder_outputs = model.get_encoder()(visual_features=features.repeat_interleave(3, 0))
    got = sequence_log_probs(model, encoder_outputs, out.sequences)
    mask, _ = eos_mask(out.sequences[:, 1:], model.config.eos_token_id)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reward


def _refs_with_eos():
    return [[c.split() + ["<eos>"] for c in caps] for caps in TRAIN_CAPTIONS]


def test_reward_eos_modes():
    with_eos, without_eos = ScstReward(TRAIN_CAPTIONS), ScstReward(TRAIN_CAPTIONS, include_eos=False)
    fragment, sentence = "a red circle on the", "a red circle on the left"
    # EOS mode: the fragment's last bigram is "the <eos>", which no reference has; the full sentence ends "left <eos>".
    cider = CiderD(_refs_with_eos())
    expected = cider.score([fragment.split() + ["<eos>"], sentence.split() + ["<eos>"]], [0, 0])
    np.testing.assert_allclose(with_eos([fragment, sentence], [0, 0]), expected, rtol=1e-12)
    # An unfinished caption (no EOS generated) gets no "<eos>" appended.
    np.testing.assert_allclose(with_eos([fragment], [0], finished=[False]),
                               cider.score([fragment.split()], [0]), rtol=1e-12)
    # SacreEOS: without EOS a trivial fragment is rewarded much closer to the full sentence.
    frag_eos, sent_eos = with_eos([fragment, sentence], [0, 0])
    frag_no, sent_no = without_eos([fragment, sentence], [0, 0])
    assert frag_eos / sent_eos < frag_no / sent_no
    assert frag_eos < frag_no


def test_reward_per_caption_document_frequency():
    references = [["a dog", "a dog runs"], ["a cat"]]
    # Every caption is one document (M²): N = 3; df counted by hand.
    df = {("a",): 3, ("dog",): 2, ("runs",): 1, ("cat",): 1, ("a", "dog"): 2, ("dog", "runs"): 1, ("a", "cat"): 1,
          ("a", "dog", "runs"): 1}
    expected = CiderD([[r.split() for r in refs] for refs in references], document_frequency=df, num_documents=3)
    reward = ScstReward(references, include_eos=False, df_mode="per_caption")
    candidates = ["a dog", "a cat runs", "dog runs"]
    got = reward(candidates, [0, 1, 0])
    np.testing.assert_allclose(got, expected.score([c.split() for c in candidates], [0, 1, 0]), rtol=1e-12)
    per_image = ScstReward(references, include_eos=False)(candidates, [0, 1, 0])
    assert not np.allclose(got, per_image)  # per image: df("dog") = 1 of N = 2


def test_reward_bleu4_mix():
    reward = ScstReward(TRAIN_CAPTIONS, cider_weight=0.0, bleu4_weight=1.0, include_eos=False)
    # Identical to a reference: every n-gram precision 1, no brevity penalty -> BLEU-4 = 1.
    assert reward(["a red circle on the left"], [0])[0] == pytest.approx(1.0, abs=1e-6)
    # "a red circle" (closest reference: "a red circle") has no 4-gram: p1 = p2 = p3 = 1 and pycocoevalcap smooths
    # p4 = (0 + 1e-15) / (0 + 1e-9), so BLEU-4 = (1e-6) ** (1/4).
    assert reward(["a red circle"], [0])[0] == pytest.approx(1e-6**0.25, rel=1e-6)
    mixed = ScstReward(TRAIN_CAPTIONS, bleu4_weight=0.5, include_eos=False)
    cider_only = ScstReward(TRAIN_CAPTIONS, include_eos=False)
    sentence = ["a red circle on the left"]
    assert mixed(sentence, [0])[0] == pytest.approx(cider_only(sentence, [0])[0] + 0.5)


def test_reward_errors():
    reward = ScstReward(TRAIN_CAPTIONS)
    with pytest.raises(IndexError, match="outside the 4 training images"):
        reward(["a dog"], [4])
    with pytest.raises(ValueError, match="must match"):
        reward(["a dog", "a cat"], [0])
    with pytest.raises(ValueError, match="df_mode"):
        ScstReward(TRAIN_CAPTIONS, df_mode="per_word")
    with pytest.raises(ValueError, match="training image 1"):
        ScstReward([["a dog"], []])


# ---------------------------------------------------------------- scst_step


@pytest.mark.parametrize("baseline,normalisation", [("mean_of_others", "token"), ("greedy", "sequence"),
                                                    ("beam_mean", "max_length")])
def test_scst_step_on_tiny_sat(baseline, normalisation):
    model, processor = tiny_sat()
    model.train()
    reward = ScstReward(TRAIN_CAPTIONS)
    pixel_values = torch.randn(3, 3, 32, 32)
    loss, stats = scst_step(model, {"pixel_values": pixel_values}, [0, 2, 3], reward, processor=processor,
                            num_samples=3, baseline=baseline, max_new_tokens=6, normalisation=normalisation)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.decoder.fc.weight.grad is not None and torch.isfinite(model.decoder.fc.weight.grad).all()
    assert len(stats["sample_captions"]) == 3 and all(isinstance(c, str) for c in stats["sample_captions"])
    for key in ("reward_mean", "baseline_mean", "advantage_mean", "sample_length_mean"):
        assert math.isfinite(stats[key])
    assert 1 <= stats["sample_length_mean"] <= 6
    if baseline == "greedy":
        assert stats["baseline_mean"] == pytest.approx(stats["greedy_reward_mean"])
    else:  # mean baselines: advantages sum to zero per image
        assert stats["advantage_mean"] == pytest.approx(0.0, abs=1e-9)
        assert stats["baseline_mean"] == pytest.approx(stats["reward_mean"])


def test_scst_step_from_features_updates_towards_rewarded_captions():
    """A few SCST steps from visual features raise the mean reward on a fixed batch (the whole loop learns)."""
    model, processor = tiny_sat(use_backbone=False)
    model.train()
    reward = ScstReward(TRAIN_CAPTIONS)
    features = torch.randn(4, 4, 96, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    torch.manual_seed(0)
    history = []
    for _ in range(40):
        loss, stats = scst_step(model, {"visual_features": features}, [0, 1, 2, 3], reward, processor=processor,
                                num_samples=4, max_new_tokens=8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(stats["reward_mean"])
    assert np.mean(history[-5:]) > np.mean(history[:5]) + 0.4


def test_scst_step_input_errors():
    model, processor = tiny_sat(use_backbone=False)
    reward = ScstReward(TRAIN_CAPTIONS)
    with pytest.raises(ValueError, match="exactly one of pixel_values / visual_features"):
        scst_step(model, {}, [0], reward, processor=processor)
    with pytest.raises(ValueError, match="2 images but 1 image indices"):
        scst_step(model, {"visual_features": torch.randn(2, 4, 96)}, [0], reward, processor=processor)
    with pytest.raises(ValueError, match="baseline must be one of"):
        scst_step(model, {"visual_features": torch.randn(1, 4, 96)}, [0], reward, processor=processor, baseline="x")
