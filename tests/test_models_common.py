"""The shared model suite: every hfcap architecture (`model_testers.TESTERS`: Show-Attend-Tell, M² on region features
and on pixels, ExpansionNet v2) against the same Hugging Face behaviour, as transformers' common model tests do.

Generation (batch = single image, cached = uncached, beam scores, attentions, one backbone pass per image, prompts,
`visual_features`, both cache argument names), save/load through the Auto classes, what transformers' own common
tests check (initialisation of a backbone missing from a checkpoint, embeddings and resizing, text config, hidden
states and cross-attentions, `torch.export`, `train()`), clear errors for bad inputs, the authors' beam search through
`generate`, and an in-process check of the pipeline, the feature cache, attention maps and an SCST step. Tiny random
models only; the architecture-specific behaviour (papers' equations, authors' quirks, fixture parity) is tested in
each architecture's own files.
"""

import functools

import numpy as np
import pytest
import timm
import torch
from model_testers import TESTERS, TRAIN_REFERENCES
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Cache, pipeline
from transformers.modeling_outputs import BaseModelOutput

import hfcap
from hfcap.compat import CACHE_NAME
from hfcap.generation import eos_mask

PIXEL_TESTERS = [tester for tester in TESTERS if tester.has_pixels]
WORD = 4  # the first word's id (every tester's vocabulary puts four special tokens first)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=TESTERS, ids=str)
def tester(request):
    return request.param


@pytest.fixture(scope="module", params=PIXEL_TESTERS, ids=str)
def pixel_tester(request):
    return request.param


@pytest.fixture(scope="module")
def model(tester):
    return tester.model()


@functools.cache
def trained_captioner(tester):
    """`tester.captioner()`, trained once per module and checked: its greedy captions are the two images' different
    `captions()`. Shared by the tests: they leave it as they found it."""
    model = tester.captioner()
    greedy = model.generate(**tester.inputs(), num_beams=1, max_new_tokens=8)
    for row, caption in zip(greedy, tester.captions()):
        words = caption[caption != -100].tolist()
        assert row[1 : 1 + len(words)].tolist() == words
    return model


@pytest.fixture(scope="module")
def captioner(tester):
    return trained_captioner(tester)


@pytest.fixture(scope="module")
def pixel_model(pixel_tester):
    return trained_captioner(pixel_tester)


def prompt_ids(tester, batch_size=2, length=4):
    """`<start> w_1 ... w_{length-1}`, different words per image."""
    words = WORD + (torch.arange(batch_size)[:, None] + torch.arange(length - 1)) % (tester.vocab_size - WORD)
    return torch.cat([torch.full((batch_size, 1), tester.bos_token_id), words], dim=1)


def real_tokens(sequences, tester):
    """`sequences[:, 1:]` and their mask up to and including the first `<end>`."""
    generated = sequences[:, 1:]
    return generated, eos_mask(generated, tester.eos_token_id)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def test_batch_equals_single_images(tester, captioner):
    inputs, labels = tester.inputs(), tester.captions()
    with torch.no_grad():
        batch = captioner(**inputs, labels=labels).logits
        for image in range(2):
            single = captioner(**tester.single_inputs(inputs, image), labels=labels[image : image + 1]).logits
            torch.testing.assert_close(single, batch[image : image + 1], atol=1e-5, rtol=0)
    for settings in ({"num_beams": 1}, {"num_beams": 3}):
        together = captioner.generate(**inputs, max_new_tokens=6, **settings)
        for image in range(2):
            alone = captioner.generate(**tester.single_inputs(inputs, image), max_new_tokens=6, **settings)
            assert together[image, : alone.shape[1]].tolist() == alone[0].tolist()
            # transformers pads finished rows with `pad_token_id or eos_token_id` (so <end> where <pad> is 0)
            assert set(together[image, alone.shape[1] :].tolist()) <= {tester.pad_token_id, tester.eos_token_id}


@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 1},
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_beams": 1, "num_return_sequences": 2, "top_k": 0},
        {"num_beams": 1, "no_repeat_ngram_size": 2},
    ],
    ids=["greedy", "beam", "beam-2-returns", "sampling", "no-repeat-ngram"],
)
def test_cached_generation_equals_uncached(tester, captioner, settings):
    results = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        results.append(captioner.generate(
            **tester.inputs(), max_new_tokens=6, use_cache=use_cache, return_dict_in_generate=True,
            output_scores=True, **settings,
        ))
    cached, uncached = results
    assert cached.sequences.shape[0] == 2 * settings.get("num_return_sequences", 1)
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_scores, uncached_scores in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(cached_scores, uncached_scores, atol=1e-5, rtol=0)
    if settings["num_beams"] > 1:
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=0)


def test_beam_scores_are_the_sequences_log_probabilities(tester, captioner):
    """`compute_transition_scores` gives each token's log-probability under teacher forcing, and `sequences_scores`
    their sum over the generated length to the power `length_penalty` (transformers' beam search)."""
    inputs = tester.inputs()
    output = captioner.generate(
        **inputs, num_beams=3, max_new_tokens=6, return_dict_in_generate=True, output_scores=True
    )
    transition = captioner.compute_transition_scores(
        output.sequences, output.scores, output.beam_indices, normalize_logits=False
    )
    generated, real = real_tokens(output.sequences, tester)
    with torch.no_grad():
        logits = captioner(**inputs, decoder_input_ids=output.sequences[:, :-1]).logits
    token_log_probs = logits.log_softmax(-1).gather(-1, generated[..., None])[..., 0]
    torch.testing.assert_close(transition, token_log_probs * real, atol=1e-5, rtol=0)
    length_penalty = captioner.generation_config.length_penalty or 1.0  # unset: transformers uses 1
    expected = transition.sum(1) / real.sum(1) ** length_penalty
    torch.testing.assert_close(output.sequences_scores, expected, atol=1e-5, rtol=0)


def test_generate_returns_cross_attentions_and_scores(tester, captioner):
    output = captioner.generate(
        **tester.inputs(), num_beams=2, max_new_tokens=4, return_dict_in_generate=True, output_attentions=True,
        output_scores=True,
    )
    assert len(output.cross_attentions) == len(output.scores) >= output.sequences.shape[1] - 1
    for step in output.cross_attentions:
        assert len(step) == tester.num_decoder_layers()
        for layer in step:
            assert layer.shape == tester.cross_attention_shape(2 * 2, 1, tester.num_positions)
            torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]))


def test_backbone_runs_once_per_image_and_features_give_the_same_captions(pixel_tester, pixel_model, monkeypatch):
    encoder, calls = pixel_model.get_encoder(), []
    backbone_stage = encoder.forward_backbone

    def counted(pixel_values):
        calls.append(pixel_values.shape[0])
        return backbone_stage(pixel_values)

    monkeypatch.setattr(encoder, "forward_backbone", counted)
    pixel_values = pixel_tester.pixel_values()
    from_pixels = pixel_model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=4)
    assert calls == [2]  # encoded once, then expanded for the beams
    features = pixel_model.get_image_features(pixel_values)
    assert features.shape == (2, pixel_tester.num_positions, pixel_model.config.visual_feature_dim)
    assert torch.equal(pixel_model.generate(visual_features=features, num_beams=3, max_new_tokens=4), from_pixels)


def test_generate_from_visual_features(tester, captioner):
    sequences = captioner.generate(**tester.feature_inputs(), num_beams=2, max_new_tokens=4)
    assert sequences.shape[0] == 2 and (sequences[:, 0] == tester.bos_token_id).all()


def test_left_padded_prompts_equal_unpadded_ones(tester, captioner):
    inputs = tester.inputs()
    pad, bos = tester.pad_token_id, tester.bos_token_id
    prompts = torch.tensor([[pad, bos, WORD], [bos, WORD + 1, WORD + 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    alone = captioner.generate(
        **tester.single_inputs(inputs, 0), input_ids=prompts[:1, 1:], num_beams=1, max_new_tokens=4
    )
    for use_cache in (True, False):
        batched = captioner.generate(
            **inputs, input_ids=prompts, attention_mask=mask, num_beams=1, max_new_tokens=4, use_cache=use_cache
        )
        assert batched[0, 1 : 1 + alone.shape[1]].tolist() == alone[0].tolist()


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
def test_forward_continues_from_the_cache_under_either_name(tester, model, cache_argument):
    """transformers >= 5.25 passes the cache as `cache`, older releases as `past_key_values`: a model must take both."""
    inputs, ids = tester.inputs(), prompt_ids(tester, length=5)
    with torch.no_grad():
        full = model(**inputs, decoder_input_ids=ids).logits
        prefix = model(**inputs, decoder_input_ids=ids[:, :2], use_cache=True)
        rest = model(**inputs, decoder_input_ids=ids[:, 2:], **{cache_argument: prefix[CACHE_NAME]})
    torch.testing.assert_close(rest.logits, full[:, 2:], atol=1e-5, rtol=0)
    assert rest[CACHE_NAME].get_seq_length() == 5
    with pytest.raises(ValueError, match="`cache` or as `past_key_values`"):
        model(**inputs, decoder_input_ids=ids[:, 2:], cache=prefix[CACHE_NAME], past_key_values=object())


def test_reference_beam_search_through_generate(tester, captioner):
    inputs = tester.inputs()
    output = captioner.generate(
        **inputs, num_beams=3, num_return_sequences=2, max_new_tokens=6, custom_generate=hfcap.reference_beam_search,
        return_dict_in_generate=True,
    )
    assert output.sequences.shape[0] == 4 and (output.sequences[:, 0] == tester.bos_token_id).all()
    assert output.sequences_scores.shape == (4,)
    scores = output.sequences_scores.view(2, 2)
    assert (scores[:, 0] >= scores[:, 1]).all()  # best first
    best = captioner.generate(**inputs, num_beams=3, max_new_tokens=6, custom_generate=hfcap.reference_beam_search)
    assert torch.equal(best, output.sequences[::2, : best.shape[1]])


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading, and what transformers' own common tests check


def test_save_load_round_trip_through_every_auto_class(tester, model, tmp_path):
    inputs, ids = tester.inputs(), prompt_ids(tester)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is tester.config_class
    with torch.no_grad():
        expected = model(**inputs, decoder_input_ids=ids).logits
        for auto_class in (AutoModel, AutoModelForImageTextToText):
            loaded = auto_class.from_pretrained(tmp_path).eval()
            assert type(loaded) is tester.model_class
            assert torch.equal(loaded(**inputs, decoder_input_ids=ids).logits, expected)
    assert loaded.generation_config.num_beams == model.generation_config.num_beams


def test_features_only_checkpoint_loaded_with_a_backbone_is_fully_initialised(pixel_tester, tmp_path):
    """`from_pretrained` builds the model on the meta device and initialises what the checkpoint lacks: here the whole
    backbone, every parameter and buffer (BatchNorm statistics, Swin's recomputed indices and masks included)."""
    pixel_tester.model(use_backbone=False).save_pretrained(tmp_path)
    model = pixel_tester.model_class.from_pretrained(tmp_path, use_backbone=True).eval()
    fresh = pixel_tester.model()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta, name
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), name
    for name, module in model.backbone.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean)), name
            assert torch.equal(module.running_var, torch.ones_like(module.running_var)), name
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert module.weight.std() > 0, name
    fresh_buffers = dict(fresh.named_buffers())
    for name, buffer in model.backbone.named_buffers(prefix="encoder.backbone"):
        if "running" not in name and "num_batches" not in name:  # what timm recomputes
            assert torch.equal(buffer, fresh_buffers[name]), name
    with torch.no_grad():
        logits = model(**pixel_tester.pixel_inputs(), decoder_input_ids=prompt_ids(pixel_tester)).logits
    assert torch.isfinite(logits).all()


def test_pretrained_backbone_weights_survive_post_init(pixel_tester, monkeypatch):
    """`use_pretrained_backbone=True`: the model's init (`post_init`) keeps timm's weights; under the meta device (as
    `from_pretrained` builds the model) nothing is downloaded."""
    create_model, requests = timm.create_model, []

    def offline_pretrained(name, pretrained=False, **kwargs):  # stands in for the Hub download
        requests.append(pretrained)
        backbone = create_model(name, pretrained=False, **kwargs)
        if pretrained:
            with torch.no_grad():
                for parameter in backbone.parameters():
                    parameter.fill_(0.5)
        return backbone

    monkeypatch.setattr(timm, "create_model", offline_pretrained)
    model = pixel_tester.model(use_pretrained_backbone=True)
    assert all((parameter == 0.5).all() for parameter in model.backbone.parameters())
    assert not (model.get_output_embeddings().weight == 0.5).all()
    with torch.device("meta"):
        pixel_tester.model_class(pixel_tester.config(use_pretrained_backbone=True))
    assert requests == [True, False]


def test_embeddings_accessors_and_resizing(tester):
    model = tester.model()
    vocab_size = tester.vocab_size
    assert model.get_input_embeddings().num_embeddings == vocab_size
    assert model.get_output_embeddings().out_features == vocab_size
    model.set_input_embeddings(model.get_input_embeddings())
    model.resize_token_embeddings(vocab_size + 3)
    assert model.config.vocab_size == vocab_size + 3
    assert model.get_input_embeddings().num_embeddings == vocab_size + 3
    assert model.get_output_embeddings().out_features == vocab_size + 3
    ids = torch.tensor([[tester.bos_token_id, vocab_size + 2]] * 2)
    with torch.no_grad():
        logits = model(**tester.inputs(), decoder_input_ids=ids).logits
    assert logits.shape == (2, 2, vocab_size + 3) and torch.isfinite(logits).all()


def test_config_reports_the_common_sizes(tester):
    config = tester.config()
    expected = (config.d_model, tester.head_axes()[-1], tester.num_decoder_layers())
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == expected
    text_config = config.get_text_config(decoder=True)
    assert (text_config.hidden_size, text_config.num_attention_heads, text_config.num_hidden_layers) == expected
    assert text_config.vocab_size == tester.vocab_size


def test_hidden_states_and_cross_attentions(tester, model):
    labels = tester.captions()
    output = model(**tester.inputs(), labels=labels, output_hidden_states=True, output_attentions=True)
    steps = labels.shape[1]
    assert output.logits.shape == (2, steps, tester.vocab_size)
    assert len(output.decoder_hidden_states) == tester.num_decoder_layers() + 1  # the embeddings, then each layer
    for hidden_states in output.decoder_hidden_states:
        assert hidden_states.shape[:2] == (2, steps) and hidden_states.requires_grad
    assert len(output.cross_attentions) == tester.num_decoder_layers()
    for attention in output.cross_attentions:
        assert attention.shape == tester.cross_attention_shape(2, steps, tester.num_positions)
    last_hidden = output.decoder_hidden_states[-1]
    (gradient,) = torch.autograd.grad(output.loss, last_hidden, retain_graph=True)
    assert gradient.abs().sum() > 0


def test_forward_exports(tester):
    """`torch.export` of a features-only model's teacher-forced `forward`, returning the cache."""
    model = tester.model(use_backbone=False)
    inputs, ids = tester.feature_inputs(), prompt_ids(tester)

    class TeacherForced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, decoder_input_ids, **visual_inputs):
            output = self.model(**visual_inputs, decoder_input_ids=decoder_input_ids, use_cache=True)
            return output.logits, output[CACHE_NAME]

    with torch.no_grad():
        expected = model(**inputs, decoder_input_ids=ids, use_cache=True)
    if isinstance(expected[CACHE_NAME], Cache):  # transformers' caches are pytree nodes through its own exporter
        exporter = pytest.importorskip("transformers.exporters.exporter_dynamo")
        exporter.register_cache_pytrees_for_model(model)
    exported = torch.export.export(TeacherForced(), (ids,), inputs)
    logits, cache = exported.module()(ids, **inputs)
    torch.testing.assert_close(logits, expected.logits)
    assert cache.get_seq_length() == ids.shape[1]


def test_train_mode_changes_no_requires_grad(tester):
    model = tester.model()
    assert all(parameter.requires_grad for parameter in model.parameters())  # no hidden freezing
    model.train()
    assert all(parameter.requires_grad for parameter in model.parameters())
    model.eval()
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_save_pretrained_with_greedy_defaults(tester, model, tmp_path):
    default = model.generation_config.num_beams
    model.generation_config.num_beams = 1  # no beam-only default (e.g. length_penalty) may make this invalid
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config.num_beams = default
    assert tester.model_class.from_pretrained(tmp_path).generation_config.num_beams == 1


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30], ids=["nan", "inf", "-inf", "1e30"])
def test_corrupt_visual_values_are_errors(tester, model, value):
    for inputs in (tester.inputs(), tester.feature_inputs()):
        name = "pixel_values" if "pixel_values" in inputs else "visual_features"
        inputs[name][1, 0, 0] = value
        with pytest.raises(ValueError, match=f"`{name}` holds NaN, infinite or implausibly large values"):
            model.generate(**inputs, max_new_tokens=3)
        with pytest.raises(ValueError, match=f"`{name}` holds NaN, infinite or implausibly large values"):
            model(**inputs, decoder_input_ids=prompt_ids(tester))


def test_empty_and_masked_out_visual_features_are_errors(tester, model):
    features = tester.feature_inputs()["visual_features"]
    with pytest.raises(ValueError, match="`visual_features` must have shape .* no empty axis"):
        model.generate(visual_features=features[:, :0], max_new_tokens=3)  # N = 0 regions
    with pytest.raises(ValueError, match="`visual_features` must have shape .* no empty axis"):
        model.generate(visual_features=features[:0], max_new_tokens=3)  # batch 0
    mask = torch.ones(features.shape[:2], dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="`visual_attention_mask` has an image without any real position"):
        model.generate(visual_features=features, visual_attention_mask=mask, max_new_tokens=3)


@pytest.mark.parametrize(
    "pixel_values",
    [
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(2, 3, 32, 32, dtype=torch.int32),
        torch.zeros(2, 3, 32, 32, dtype=torch.bool),
        torch.zeros(2, 3, 32, 32, dtype=torch.complex64),
        np.zeros((2, 3, 32, 32), dtype=np.float32),
        np.zeros((2, 3, 32, 32), dtype=np.float32).tolist(),
        torch.zeros(2, 3, 32, 32, device="meta"),
        torch.zeros(0, 3, 32, 32),
    ],
    ids=["uint8", "int32", "bool", "complex", "numpy", "list", "meta", "batch-0"],
)
def test_bad_pixel_values_are_errors(tester, model, pixel_values):
    with pytest.raises((ValueError, TypeError), match="`pixel_values`"):
        model.generate(pixel_values=pixel_values, max_new_tokens=3)
    with pytest.raises((ValueError, TypeError), match="`pixel_values`"):
        model(pixel_values=pixel_values, decoder_input_ids=prompt_ids(tester))
    if tester.has_pixels:
        with pytest.raises((ValueError, TypeError), match="`pixel_values`"):
            model.get_image_features(pixel_values)


def test_generate_without_images_is_an_error(tester, model):
    with pytest.raises(ValueError, match="Pass the images"):
        model.generate(max_new_tokens=3)


def test_images_the_backbone_cannot_take_are_errors(pixel_tester, pixel_model, monkeypatch):
    small = pixel_tester.pixel_values(size=16)
    with pytest.raises(ValueError, match="`pixel_values` .*16"):
        pixel_model.generate(pixel_values=small, max_new_tokens=3)
    with pytest.raises(ValueError, match="`pixel_values` .*16"):
        pixel_model.get_image_features(small)

    def refuse(pixel_values):  # what a backbone does with an input smaller than its kernels
        raise RuntimeError("Kernel size can't be greater than actual input size")

    monkeypatch.setattr(pixel_model.get_encoder(), "forward_backbone", refuse)
    size = pixel_tester.image_size
    with pytest.raises(ValueError, match=f"cannot take `pixel_values` of {size}x{size} px: Kernel size"):
        pixel_model.get_image_features(pixel_tester.pixel_values())


def test_encoder_outputs_of_the_wrong_width_are_errors(tester, model):
    inputs, ids = tester.inputs(), prompt_ids(tester)
    with torch.no_grad():
        good = model.get_encoder()(**inputs).last_hidden_state
    wrong = torch.randn(*good.shape[:-1], good.shape[-1] + 1)
    with pytest.raises(ValueError, match="`encoder_outputs.last_hidden_state` must have shape"):
        model(encoder_outputs=(wrong,), decoder_input_ids=ids)
    with pytest.raises(ValueError, match="`encoder_outputs.last_hidden_state` must have shape"):
        model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=wrong), max_new_tokens=3)


def bad_prompts(tester):
    ids = prompt_ids(tester, length=3)
    return {
        "out-of-vocabulary": ids.clone().index_fill_(1, torch.tensor([2]), tester.vocab_size),
        "negative": ids.clone().index_fill_(1, torch.tensor([2]), -1),
        "float": ids.float(),
        "empty": ids[:, :0],
        "batch-mismatch": ids[:1],
    }


@pytest.mark.parametrize("kind", ["out-of-vocabulary", "negative", "float", "empty", "batch-mismatch"])
def test_bad_prompts_are_errors(tester, model, kind):
    ids, inputs = bad_prompts(tester)[kind], tester.inputs()
    with pytest.raises(ValueError, match="`input_ids`"):
        model.generate(**inputs, input_ids=ids, max_new_tokens=3)
    with pytest.raises(ValueError, match="`decoder_input_ids`"):
        model(**inputs, decoder_input_ids=ids)


def test_labels_that_are_all_ignored_are_an_error(tester, model):
    with pytest.raises(ValueError, match="`labels` are all -100"):
        model(**tester.inputs(), labels=torch.full((2, 3), -100))


def test_reference_beam_search_rejects_impossible_beam_sizes(tester, model):
    for num_beams in (0, tester.vocab_size + 1):
        with pytest.raises(ValueError, match="num_beams"):
            model.generate(
                **tester.inputs(), num_beams=num_beams, max_new_tokens=3, custom_generate=hfcap.reference_beam_search
            )


def test_lengths_beyond_the_models_ceiling_fail_at_once(tester, model):
    ceiling = model.max_new_tokens_limit
    for name, value in [("max_new_tokens", 10**9), ("max_new_tokens", ceiling + 1), ("max_length", 10**9)]:
        with pytest.raises(ValueError, match=rf"`{name}` must lie in \[1, {ceiling + (name == 'max_length')}\]"):
            model.generate(**tester.inputs(), **{name: value})
    assert model.generate(**tester.inputs(), num_beams=1, max_new_tokens=ceiling).shape[1] <= ceiling + 1


# ----------------------------------------------------------------------------------------------------------------------
# The shared modules on every architecture (in-process)


@pytest.fixture(scope="module")
def saved_captioner(pixel_tester, pixel_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp(pixel_tester.name)
    pixel_model.save_pretrained(directory)
    pixel_tester.processor().save_pretrained(directory)
    return directory


def test_pipeline_captions_an_image(pixel_tester, saved_captioner):
    captioner = pipeline("image-to-text", model=str(saved_captioner))
    result = captioner(pixel_tester.images(1)[0], generate_kwargs={"max_new_tokens": 5})
    assert isinstance(result, list) and isinstance(result[0]["generated_text"], str)


def test_feature_cache_round_trip(pixel_tester, pixel_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    from hfcap.training.feature_cache import CachedFeatureDataset, cache_visual_features

    images, processor = pixel_tester.images(2), pixel_tester.processor()
    dataset = datasets.Dataset.from_dict({"image": images, "image_id": [10, 11]})
    cache_visual_features(pixel_model, processor, dataset, tmp_path / "features")
    cached = CachedFeatureDataset(tmp_path / "features")
    with torch.no_grad():
        expected = pixel_model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    assert len(cached) == 2
    for index, image_id in enumerate([10, 11]):
        assert cached[index]["image_id"] == image_id
        torch.testing.assert_close(cached[index]["visual_features"], expected[index], atol=1e-5, rtol=0)


def test_attention_maps_are_written(pixel_tester, pixel_model, tmp_path):
    from hfcap.visualize import save_attention_maps

    paths = [tmp_path / "first.png", tmp_path / "second.png"]
    captions = save_attention_maps(pixel_model, pixel_tester.processor(), pixel_tester.images(2), paths, num_beams=2,
                                   max_new_tokens=4)
    assert len(captions) == 2
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG")


def test_scst_step_gives_a_finite_loss_with_gradients(tester):
    from hfcap.training.scst import ScstReward, scst_step

    model = tester.model().train()
    loss, stats = scst_step(
        model, tester.inputs(), [0, 1], ScstReward(TRAIN_REFERENCES), processor=tester.processor(), num_samples=2,
        baseline="mean_of_others", max_new_tokens=5,
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None
