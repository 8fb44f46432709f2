"""Smoke test of hfcap's model / processor / generation / pipeline code against the installed transformers, on the CPU
and (when present) on CUDA: `python benchmarks/check_compat.py`. Made to check an environment other than the one the
tests run in (the GPU machine has transformers 5.17, huggingface_hub 1.33 and no `datasets`), without pytest.

A tiny Show-Attend-Tell (timm `test_resnet`) and its processor are saved with `save_pretrained`, reloaded through
`AutoModel`, `AutoModelForImageTextToText` and `AutoProcessor`, and must give the same logits; then greedy, beam,
sampling (the SCST call) and the reference beam search run through `generate`, and `pipeline("image-to-text")` /
`pipeline("image-text-to-text")` must caption images alone (one, a batch, several returned sequences) exactly as
`generate` + `batch_decode` do. Each check prints PASS/FAIL; the exit status is 1 if any fails.
"""

import os
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline  # noqa: E402

import hfcap  # noqa: E402
from hfcap.processing import CaptioningProcessor, build_word_level_tokenizer, make_image_processor  # noqa: E402

CAPTIONS = ["a red circle on the left", "a blue square at the top", "two green triangles", "a small yellow star"]
RESULTS = []


def run_check(name, function, *args):
    """Run one check; print PASS (with the details it returns) or FAIL with the traceback, and go on."""
    try:
        detail = function(*args)
        RESULTS.append(True)
        print(f"PASS  {name}{'  ' + detail if detail else ''}", flush=True)
    except Exception:  # noqa: BLE001  a failed check is reported, the others still run
        RESULTS.append(False)
        print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)


def tiny_model_and_processor():
    tokenizer = build_word_level_tokenizer(CAPTIONS, min_frequency=1)
    processor = CaptioningProcessor(make_image_processor(32), tokenizer, max_caption_length=12)
    config = hfcap.ShowAttendTellConfig(
        vocab_size=len(tokenizer), visual_feature_dim=96, attention_dim=16, embed_dim=16, d_model=16,
        encoder_grid_size=2, backbone="test_resnet", dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = hfcap.ShowAttendTellForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger output weights than the init, so that captions depend on the image
        model.decoder.init_h.weight.normal_(std=0.5)
        model.decoder.fc.weight.normal_(std=2.0)
    return model, processor


def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 256, (30, 36, 4), dtype=np.uint8), mode="RGBA"),
    ]


def check_save_and_auto_reload(model, processor, directory, pictures):
    inputs = processor(images=pictures, text_target=CAPTIONS[:3])
    reference = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        reloaded = auto_class.from_pretrained(directory).eval()
        assert type(reloaded) is type(model), type(reloaded)
        for name, value in reloaded.state_dict().items():
            assert torch.equal(value, model.state_dict()[name]), f"{name} changed"
        output = reloaded(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        # Same weights, but a new allocation may take another CPU kernel path: float32 rounding only.
        torch.testing.assert_close(output.logits, reference.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(output.loss, reference.loss, rtol=0, atol=1e-5)
    again = AutoProcessor.from_pretrained(directory)
    assert type(again) is CaptioningProcessor, type(again)
    assert torch.equal(again(images=pictures, text_target=CAPTIONS[:3])["labels"], inputs["labels"])
    return f"files {sorted(os.listdir(directory))}"


def check_training_step(processor, directory, pictures):
    inputs = processor(images=pictures, text_target=CAPTIONS[:3])
    model = AutoModel.from_pretrained(directory).train()
    model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss.backward()
    assert model.decoder.fc.weight.grad is not None and model.decoder.fc.weight.grad.abs().sum() > 0


def check_generate(model, processor, pixel_values):
    greedy = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=10)
    uncached = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=10, use_cache=False)
    assert torch.equal(greedy, uncached), "cached and uncached greedy differ"
    beam = model.generate(pixel_values=pixel_values, num_beams=3, num_return_sequences=2, max_new_tokens=10)
    assert beam.shape[0] == 6
    sampled = model.generate(  # the SCST call; num_beams=1 overrides the model's default of 5 beams
        pixel_values=pixel_values, do_sample=True, num_beams=1, num_return_sequences=4, max_new_tokens=10,
        return_dict_in_generate=True, output_scores=True,
    )
    assert sampled.sequences.shape[0] == 12 and len(sampled.scores) == sampled.sequences.shape[1] - 1
    reference = model.generate(
        pixel_values=pixel_values, num_beams=3, custom_generate=hfcap.reference_beam_search,
        max_new_tokens=10, return_dict_in_generate=True, output_attentions=True,
    )
    assert reference.sequences.shape[0] == 3 and reference.cross_attentions[0].shape[-1] == 4
    one_beam = model.generate(
        pixel_values=pixel_values, num_beams=1, custom_generate=hfcap.reference_beam_search, max_new_tokens=10
    )
    assert torch.equal(one_beam, greedy), "reference beam 1 is not greedy decoding"
    outputs = {"greedy": greedy, "beam": beam, "sample": sampled.sequences, "reference": reference.sequences}
    shapes = {name: tuple(ids.shape) for name, ids in outputs.items()}
    return f"shapes {shapes}; e.g. {processor.batch_decode(greedy[:1])}"


def check_pipeline(model, processor, directory, pictures, device):
    pixel_values = processor(images=pictures)["pixel_values"].to(device)
    expected = processor.batch_decode(model.generate(pixel_values=pixel_values))
    captioner = pipeline("image-to-text", model=directory, device=device)
    assert captioner.task == "image-text-to-text", captioner.task
    assert captioner(pictures[0]) == [{"generated_text": expected[0]}]
    batched = captioner(pictures, batch_size=2)
    assert batched == [[{"generated_text": text}] for text in expected], batched
    settings = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}
    several = processor.batch_decode(model.generate(pixel_values=pixel_values, **settings))
    got = captioner(pictures, batch_size=2, generate_kwargs=settings)
    assert got == [[{"generated_text": text} for text in several[2 * i : 2 * i + 2]] for i in range(3)], got
    reference = {"num_beams": 3, "custom_generate": hfcap.reference_beam_search}
    authors = processor.batch_decode(model.generate(pixel_values=pixel_values[:1], **reference))
    assert captioner(pictures[0], generate_kwargs=reference) == [{"generated_text": authors[0]}]
    other_name = pipeline("image-text-to-text", model=directory, device=device)
    assert other_name(pictures[1]) == [{"generated_text": expected[1]}]
    return f"captions {expected}"


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, devices {devices}")
    model, processor = tiny_model_and_processor()
    pictures = images()
    directory = tempfile.mkdtemp(prefix="hfcap-compat-")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)

    run_check(
        "save_pretrained + AutoModel / AutoModelForImageTextToText / AutoProcessor reload, same logits",
        check_save_and_auto_reload, model, processor, directory, pictures,
    )
    run_check("training step: loss.backward() reaches the decoder", check_training_step, processor, directory, pictures)
    for device in devices:
        on_device = AutoModelForImageTextToText.from_pretrained(directory).eval().to(device)
        pixel_values = processor(images=pictures)["pixel_values"].to(device)
        run_check(
            f"generate greedy / beam / sampling / reference beam on {device}",
            check_generate, on_device, processor, pixel_values,
        )
        run_check(
            f"pipeline('image-to-text') and ('image-text-to-text') caption images alone on {device}",
            check_pipeline, on_device, processor, directory, pictures, device,
        )

    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
