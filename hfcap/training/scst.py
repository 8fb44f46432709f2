"""Self-critical sequence training (SCST): CIDEr-D reward, baselines, policy-gradient loss and one training step.

API (what the trainer calls)
----------------------------
``ScstReward(train_references, *, include_eos=True, df_mode="per_image", cider_weight=1.0, bleu4_weight=0.0)``
    ``train_references[i]`` = the raw reference captions of training image ``i``. Builds ``hfcap.metrics.CiderD`` once
    (document frequencies from the training references, tokenised with ``simple_tokenize``).
    ``reward(captions: list[str], image_indices, finished=None) -> np.ndarray (N,)`` scores caption ``j`` against the
    references of training image ``image_indices[j]``; ``finished[j]`` (default True) says whether caption ``j`` ended
    with EOS, which decides whether ``"<eos>"`` is appended to it when ``include_eos``.
``compute_advantages(rewards (B, k), baseline, greedy_rewards=None (B,)) -> np.ndarray (B, k)``
    ``baseline`` in ``BASELINES`` = ``"greedy"`` | ``"mean_of_others"`` | ``"beam_mean"``.
``scst_loss(token_logprobs (N, T), mask (N, T), advantages (N,), normalisation="token", max_length=None) -> scalar``
    ``normalisation`` in ``NORMALISATIONS`` = ``"token"`` | ``"sequence"`` | ``"max_length"``.
``sequence_log_probs(model, encoder_outputs, sequences (N, T)) -> (N, T-1)``: teacher-forced, differentiable log-probs.
``scst_step(model, inputs, image_indices, reward, *, processor, accelerator=None, num_samples=5,
baseline="mean_of_others", max_new_tokens=20, normalisation="token", generate_kwargs=None) -> (loss, stats)``
    ``inputs`` = ``{"pixel_values": (B, 3, H, W)}`` or
    ``{"visual_features": (B, N, D)[, "visual_attention_mask": (B, N)]}``.
    Returns the differentiable loss (call ``accelerator.backward(loss)`` yourself) and ``stats`` with floats
    ``reward_mean``, ``baseline_mean``, ``advantage_mean``, ``sample_length_mean`` (+ ``greedy_reward_mean`` for the
    greedy baseline) and ``sample_captions`` (the first image's k captions).

The reference recipes (hfcap's defaults = NSC as in self-critical.pytorch)
----------------------------------------------------------------------------
===============================  ================  ==================  ===  ===========  ==================
recipe                           samples           ``baseline``        EOS  ``df_mode``  ``normalisation``
===============================  ================  ==================  ===  ===========  ==================
SCST (Rennie et al. 2017),       multinomial       ``greedy``          yes  per_image    ``token``
self-critical.pytorch
NSC (Luo 2020),                  multinomial, k=5  ``mean_of_others``  yes  per_image    ``token``
self-critical.pytorch
ExpansionNet v2                  multinomial, k=5  ``mean_of_others``  yes  per_image    ``sequence``
M² Transformer                   beam, k=5         ``beam_mean``       no   per_caption  ``max_length`` (20)
===============================  ================  ==================  ===  ===========  ==================

- df "per image": a document is the set of an image's references, N = number of training images
  (self-critical.pytorch's ``coco-train-idxs``, ExpansionNet v2's ``ReinforceCider``). df "per caption": every training
  caption is its own document, N = number of captions (M² builds ``Cider`` on the flat list of PTB-tokenised captions).
  Either way a candidate is scored against the references of its own image.
- Loss normalisations (A = advantage, m = mask up to and including EOS):
  ``token``      −Σ_{n,t} m·A_n·log p / Σ_{n,t} m      (self-critical.pytorch ``RewardCriterion`` and NSC)
  ``sequence``   −mean_n A_n·Σ_t m·log p               (ExpansionNet v2)
  ``max_length`` −mean_n A_n·Σ_t m·log p / max_length  (M²: mean over the 20 decoding steps, padding counts as 0)
- Samples are drawn by ``generate`` without gradients, in the model's current mode (the trainer keeps it in train
  mode, so dropout is on as in all three references); the log-probs are then recomputed by a teacher-forced forward
  pass of the (possibly DDP-wrapped) model. Dropout masks of that pass differ from the sampling pass, whereas the
  references take the log-probs from the sampling pass itself. The greedy baseline is decoded in eval mode.
- M² beam SCST with the authors' beam search: ``generate_kwargs={"custom_generate": hfcap.reference_beam_search}``.
  Rewards always use ``simple_tokenize`` words (M² PTB-tokenises with Java in every batch).
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from hfcap.generation import eos_mask

BASELINES = ("greedy", "mean_of_others", "beam_mean")
NORMALISATIONS = ("token", "sequence", "max_length")
DF_MODES = ("per_image", "per_caption")
EOS_WORD = "<eos>"  # cannot collide with a caption word: simple_tokenize strips "<" and ">"

# Multinomial sampling at temperature 1 over the full vocabulary, whatever the saved generation_config says.
_PURE_SAMPLING = dict(do_sample=True, num_beams=1, top_k=0, top_p=1.0, temperature=1.0, no_repeat_ngram_size=0,
                      repetition_penalty=1.0)
_PURE_BEAM = dict(do_sample=False, no_repeat_ngram_size=0, repetition_penalty=1.0, length_penalty=0.0)
_PURE_GREEDY = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0)


class ScstReward:
    """CIDEr-D (optionally mixed with BLEU-4) reward of sampled captions against their training image's references.

    Args:
        train_references: one sequence of raw reference captions per training image; ``image_indices`` index it.
        include_eos: append ``"<eos>"`` to every reference and to every finished candidate (SacreEOS "Standard",
            self-critical.pytorch / ExpansionNet v2); False = M²'s "No<EOS>".
        df_mode: ``"per_image"`` (self-critical.pytorch, ExpansionNet v2) or ``"per_caption"`` (M²); see the
            module doc.
        cider_weight, bleu4_weight: reward = cider_weight·CIDEr-D + bleu4_weight·BLEU-4 (self-critical.pytorch's
            ``--cider_reward_weight`` / ``--bleu_reward_weight``; BLEU-4 per caption, pycocoevalcap, "closest" length).
    """

    def __init__(self, train_references: Sequence[Sequence[str]], *, include_eos: bool = True,
                 df_mode: str = "per_image", cider_weight: float = 1.0, bleu4_weight: float = 0.0):
        from hfcap.metrics import CiderD

        if df_mode not in DF_MODES:
            raise ValueError(f"df_mode must be one of {DF_MODES}, got {df_mode!r}")
        for index, refs in enumerate(train_references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"training image {index} needs a list of at least one reference caption, got {refs!r}")
        self.include_eos = include_eos
        self.df_mode = df_mode
        self.cider_weight = cider_weight
        self.bleu4_weight = bleu4_weight
        self.references = [[self._tokens(caption, finished=True) for caption in refs] for refs in train_references]
        self.cider = CiderD(self.references, **self._df_kwargs())

    def _df_kwargs(self) -> dict:
        if self.df_mode == "per_image":
            return {}
        # M²: every caption is a document; df(w) = number of training captions containing the n-gram w.
        document_frequency = Counter()
        for tokens in (ref for refs in self.references for ref in refs):
            document_frequency.update({tuple(tokens[i:i + n]) for n in range(1, 5) for i in range(len(tokens) - n + 1)})
        return {"document_frequency": document_frequency, "num_documents": sum(map(len, self.references))}

    def _tokens(self, caption: str, finished: bool) -> list[str]:
        from hfcap.metrics import simple_tokenize

        return simple_tokenize(caption) + ([EOS_WORD] if self.include_eos and finished else [])

    def __call__(self, captions: Sequence[str], image_indices: Sequence[int],
                 finished: Sequence[bool] | None = None) -> np.ndarray:
        """Rewards (N,) float64 of ``captions[j]`` against the references of training image ``image_indices[j]``."""
        image_indices = [int(i) for i in image_indices]
        finished = [True] * len(captions) if finished is None else [bool(f) for f in finished]
        if not len(captions) == len(image_indices) == len(finished):
            raise ValueError(f"got {len(captions)} captions, {len(image_indices)} image indices and "
                             f"{len(finished)} finished flags; they must match")
        bad = [i for i in image_indices if not 0 <= i < len(self.references)]
        if bad:
            raise IndexError(f"image indices {bad[:5]} are outside the {len(self.references)} training images")
        candidates = [self._tokens(caption, done) for caption, done in zip(captions, finished)]
        rewards = np.zeros(len(candidates))
        if self.cider_weight:
            rewards += self.cider_weight * np.asarray(self.cider.score(candidates, image_indices), dtype=np.float64)
        if self.bleu4_weight:
            rewards += self.bleu4_weight * self._bleu4(candidates, image_indices)
        return rewards

    def _bleu4(self, candidates: list[list[str]], image_indices: list[int]) -> np.ndarray:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        scorer = BleuScorer(n=4)
        for tokens, index in zip(candidates, image_indices):
            scorer += (" ".join(tokens), [" ".join(ref) for ref in self.references[index]])
        _, per_caption = scorer.compute_score(option="closest", verbose=0)
        return np.asarray(per_caption[3], dtype=np.float64)


def compute_advantages(rewards, baseline: str, greedy_rewards=None) -> np.ndarray:
    """Advantages A = r − b, shape (B, k), for k captions per image.

    ``greedy``: b = reward of the image's greedy caption, ``greedy_rewards`` (B,) (Rennie et al. 2017).
    ``mean_of_others``: b_i = (Σ_j r_j − r_i) / (k − 1) (Luo 2020 "new self-critical"; ExpansionNet v2).
    ``beam_mean``: b = mean_j r_j over the k beams (M²).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (batch, samples), got {rewards.shape}")
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("the greedy baseline needs greedy_rewards (one per image)")
        greedy_rewards = np.asarray(greedy_rewards, dtype=np.float64)
        if greedy_rewards.shape != rewards.shape[:1]:
            raise ValueError(f"greedy_rewards must have shape ({rewards.shape[0]},), got {greedy_rewards.shape}")
        return rewards - greedy_rewards[:, None]
    if baseline == "mean_of_others":
        k = rewards.shape[1]
        if k < 2:
            raise ValueError("the mean_of_others baseline needs at least 2 samples per image")
        return rewards - (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
    if baseline == "beam_mean":
        return rewards - rewards.mean(1, keepdims=True)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def scst_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              normalisation: str = "token", max_length: int | None = None) -> torch.Tensor:
    """Policy-gradient loss −A·log p(w) (REINFORCE with baseline), normalised as one of the references does.

    Args:
        token_logprobs: (N, T) log p(w_t | w_<t, I) of the sampled tokens, differentiable.
        mask: (N, T) 1 for tokens up to and including the first EOS, else 0.
        advantages: (N,) r − b, constant.
        normalisation: ``"token"``, ``"sequence"`` or ``"max_length"`` (module doc); ``max_length`` is the divisor of
            the last one (M²: 20).
    """
    mask = mask.to(token_logprobs.dtype)
    weighted = -token_logprobs * mask * advantages.to(token_logprobs).detach()[:, None]  # (N, T)
    if normalisation == "token":
        return weighted.sum() / mask.sum().clamp(min=1)
    if normalisation == "sequence":
        return weighted.sum(1).mean()
    if normalisation == "max_length":
        if not max_length:
            raise ValueError("normalisation='max_length' needs max_length (M2: 20)")
        return weighted.sum(1).mean() / max_length
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


def sequence_log_probs(model, encoder_outputs, sequences: torch.Tensor) -> torch.Tensor:
    """Differentiable log p(w_t | w_<t, I) (N, T−1), float32, of generated ``sequences`` (N, T) =
    ``[start, w_1, ...]``, by one teacher-forced forward of ``model`` on ``encoder_outputs`` (batch N)."""
    logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=sequences[:, :-1], use_cache=False).logits
    return logits.float().log_softmax(-1).gather(-1, sequences[:, 1:].unsqueeze(-1)).squeeze(-1)


def _expand_encoder_outputs(encoder_outputs, k: int):
    """Repeat every tensor field of a ModelOutput k times along the batch (image-major, as ``generate`` does)."""
    return type(encoder_outputs)(**{name: value.repeat_interleave(k, dim=0)
                                    for name, value in encoder_outputs.items() if torch.is_tensor(value)})


def scst_step(model, inputs: Mapping[str, torch.Tensor], image_indices: Sequence[int], reward: ScstReward, *,
              processor, accelerator=None, num_samples: int = 5, baseline: str = "mean_of_others",
              max_new_tokens: int = 20, normalisation: str = "token", generate_kwargs: dict | None = None):
    """One SCST loss evaluation on a batch of B images (the caller does backward and the optimiser step).

    1. run the encoder once on ``inputs`` (with gradients, so an unfrozen backbone is trained);
    2. draw k = ``num_samples`` captions per image with ``generate`` on the reused encoder outputs, no gradients
       (multinomial sampling; k beams for ``beam_mean``); decode them with ``processor``;
    3. reward them with ``reward`` and form advantages with ``baseline`` (the greedy baseline decodes once more, in
       eval mode);
    4. recompute log p of the sampled tokens by a teacher-forced forward of ``model`` (the DDP-wrapped one, so
       gradients are synchronised) on the k-fold expanded encoder outputs, and return ``scst_loss``.

    Args:
        model: the captioning model, possibly wrapped by ``accelerator.prepare``; in the mode SCST should run in
            (train mode, as the references).
        inputs: ``{"pixel_values": (B, 3, H, W)}`` or ``{"visual_features": (B, N, D)}`` (+ ``visual_attention_mask``).
        image_indices: (B,) indices into the ``train_references`` that built ``reward``.
        processor: tokenizer or ``CaptioningProcessor`` (its ``batch_decode`` turns token ids into captions).
        accelerator: the ``Accelerator`` that prepared ``model`` (for unwrapping and autocast), or None.
        generate_kwargs: extra ``generate`` arguments for the sampling call (e.g. ``custom_generate``).
    Returns:
        ``(loss, stats)``: scalar loss tensor; stats as in the module doc.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    encoder_keys = {"pixel_values", "visual_features"} & inputs.keys()
    if len(encoder_keys) != 1:
        raise ValueError(f"inputs must hold exactly one of pixel_values / visual_features, got {sorted(inputs)}")
    image_indices = np.asarray([int(i) for i in image_indices])
    batch_size, k = len(image_indices), num_samples
    eos, pad = unwrapped.config.eos_token_id, unwrapped.config.pad_token_id

    with autocast():
        encoder_outputs = unwrapped.get_encoder()(**inputs, return_dict=True)
    if encoder_outputs.last_hidden_state.shape[0] != batch_size:
        raise ValueError(f"{encoder_outputs.last_hidden_state.shape[0]} images but {batch_size} image indices")

    decoding = dict(_PURE_BEAM, num_beams=k) if baseline == "beam_mean" else dict(_PURE_SAMPLING)
    decoding.update(generate_kwargs or {})
    with torch.no_grad():
        detached = type(encoder_outputs)(**{n: v.detach() for n, v in encoder_outputs.items() if torch.is_tensor(v)})
        sequences = unwrapped.generate(encoder_outputs=detached, **decoding, num_return_sequences=k,
                                       max_new_tokens=max_new_tokens)
    mask, finished = eos_mask(sequences[:, 1:], eos)  # (B·k, T); position 0 of sequences is the start token
    captions = processor.batch_decode(sequences[:, 1:].masked_fill(~mask, pad), skip_special_tokens=True)
    rewards = reward(captions, np.repeat(image_indices, k), finished=finished.cpu().numpy()).reshape(batch_size, k)

    greedy_rewards = None
    if baseline == "greedy":
        greedy_rewards = _greedy_rewards(unwrapped, inputs, image_indices, reward, processor, max_new_tokens)
    advantages = compute_advantages(rewards, baseline, greedy_rewards)

    with autocast():
        token_logprobs = sequence_log_probs(model, _expand_encoder_outputs(encoder_outputs, k), sequences)
    loss = scst_loss(token_logprobs, mask, torch.as_tensor(advantages.reshape(-1), device=token_logprobs.device),
                     normalisation, max_length=max_new_tokens)

    stats = {
        "reward_mean": float(rewards.mean()),
        "baseline_mean": float((rewards - advantages).mean()),
        "advantage_mean": float(advantages.mean()),
        "sample_length_mean": float(mask.sum(1).float().mean()),
        "sample_captions": captions[:k],
    }
    if greedy_rewards is not None:
        stats["greedy_reward_mean"] = float(greedy_rewards.mean())
    return loss, stats


def _greedy_rewards(model, inputs, image_indices, reward, processor, max_new_tokens) -> np.ndarray:
    """Rewards (B,) of the greedy captions, decoded in eval mode without gradients (self-critical.pytorch)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sequences = model.generate(**inputs, **_PURE_GREEDY, max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    mask, finished = eos_mask(sequences[:, 1:], model.config.eos_token_id)
    captions = processor.batch_decode(sequences[:, 1:].masked_fill(~mask, model.config.pad_token_id),
                                      skip_special_tokens=True)
    return reward(captions, image_indices, finished=finished.cpu().numpy())
