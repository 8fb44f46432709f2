"""`pipeline("image-to-text" | "image-text-to-text", model=DIR)` on hfcap models: images alone, lists, batching,
generation settings, the authors' beam search, prompts, URLs, and clear errors for bad inputs."""

import functools
import http.server
import threading

import numpy as np
import pytest
from conftest import CAPTIONER_VOCAB, save_images, save_tiny_captioner
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    VisionTextDualEncoderProcessor,
    pipeline,
)

import hfcap
from hfcap.pipelines import ImageCaptioningPipeline
from hfcap.processing import ImageLoadError

EOS, DOG = CAPTIONER_VOCAB.index("<eos>"), CAPTIONER_VOCAB.index("dog")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def captioner(model_dir):
    return pipeline("image-to-text", model=str(model_dir))


@pytest.fixture(scope="module")
def reference(model_dir):
    """`caption(image, **generate_kwargs)`: the model's captions by direct `generate` + `batch_decode`."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def caption(image, **generate_kwargs):
        return processor.batch_decode(model.generate(**processor(images=image), **generate_kwargs))

    return caption


def test_both_task_names_build_the_captioning_pipeline(captioner, model_dir):
    assert type(captioner) is ImageCaptioningPipeline
    assert captioner.task == "image-text-to-text"
    assert type(pipeline("image-text-to-text", model=str(model_dir))) is ImageCaptioningPipeline


def test_other_processors_keep_the_stock_pipeline(model_dir, images):
    """Only a CaptioningProcessor turns on the image-only behaviour; with any other processor the registered class
    acts as transformers' ImageTextToTextPipeline."""
    captioning = AutoProcessor.from_pretrained(model_dir)
    other = VisionTextDualEncoderProcessor(image_processor=captioning.image_processor, tokenizer=captioning.tokenizer)
    stock = pipeline("image-text-to-text", model=str(model_dir), processor=other)
    assert not stock.is_captioner
    with pytest.raises(ValueError, match="You must provide text for this pipeline"):
        stock(Image.open(images[0]))


def test_image_alone_gives_the_models_caption(captioner, reference, images):
    expected = reference(Image.open(images[0]))[0]
    assert expected and not {"<bos>", "<eos>", "<pad>"} & set(expected.split())
    assert captioner(Image.open(images[0])) == [{"generated_text": expected}]
    assert captioner(str(images[0])) == [{"generated_text": expected}]
    assert captioner(np.asarray(Image.open(images[0]))) == [{"generated_text": expected}]
    assert captioner(images=str(images[0])) == [{"generated_text": expected}]


def test_generation_config_defaults_are_the_models(tmp_path):
    """The pipeline decodes with generation_config.json (51 new tokens), not transformers' pipeline default (256)."""
    dog_pipe = pipeline("image-to-text", model=str(save_tiny_captioner(tmp_path / "dog", constant_token=DOG)))
    image = Image.new("RGB", (20, 20))
    assert dog_pipe(image) == [{"generated_text": " ".join(["dog"] * 51)}]
    assert dog_pipe(image, max_new_tokens=3) == [{"generated_text": "dog dog dog"}]
    eos_pipe = pipeline("image-to-text", model=str(save_tiny_captioner(tmp_path / "eos", constant_token=EOS)))
    assert eos_pipe(image) == [{"generated_text": ""}]  # [bos, eos]: both special tokens removed


def test_list_of_images_batched(captioner, reference, images):
    inputs = [Image.open(images[0]), str(images[1]), Image.open(images[2])]
    expected = [[{"generated_text": reference(image)[0]}] for image in inputs]
    assert len({result[0]["generated_text"] for result in expected}) == 3
    assert captioner(inputs) == expected
    assert captioner(inputs, batch_size=2) == expected
    assert captioner(tuple(inputs)) == expected
    assert list(captioner(image for image in inputs)) == expected


def test_generate_kwargs_and_return_sequences(captioner, reference, images):
    image = Image.open(images[0])
    settings = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6}
    expected = [{"generated_text": text} for text in reference(image, **settings)]
    assert len(expected) == 2
    assert captioner(image, generate_kwargs=settings) == expected
    assert captioner([image, image], generate_kwargs=settings, batch_size=2) == [expected, expected]
    assert captioner(image, generate_kwargs={"do_sample": False, "num_beams": 1}, max_new_tokens=4) == [
        {"generated_text": reference(image, num_beams=1, max_new_tokens=4)[0]}
    ]


def test_authors_beam_search_through_the_pipeline(captioner, reference, images):
    image = Image.open(images[1])
    settings = {"num_beams": 3, "num_return_sequences": 2, "custom_generate": hfcap.reference_beam_search}
    expected = [{"generated_text": text} for text in reference(image, **settings)]
    assert captioner(image, generate_kwargs=settings) == expected


def test_text_prompts(captioner, model_dir, images):
    image = Image.open(images[0])
    alone = captioner(image)
    assert captioner(image, text="") == alone
    assert pipeline("image-text-to-text", model=str(model_dir))(image, text="") == alone
    prompted = captioner(image, text="a man", max_new_tokens=3)
    assert prompted[0]["input_text"] == "a man"
    assert prompted[0]["generated_text"].startswith("a man ")
    assert len(prompted[0]["generated_text"].split()) <= 5


def test_image_from_url(captioner, images):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{images[2].name}"
        assert captioner(url) == captioner(str(images[2]))
    finally:
        server.shutdown()
        server.server_close()


def test_unreadable_images_name_the_file(captioner, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        captioner(str(corrupt))
    with pytest.raises(ImageLoadError, match="missing.png"):
        captioner([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="needs images"):
        captioner(text="a man")


def _copy_model_without_processor(model_dir, directory):
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (directory / name).write_bytes((model_dir / name).read_bytes())


def test_model_directory_without_processor(model_dir, tmp_path):
    _copy_model_without_processor(model_dir, tmp_path)
    with pytest.raises(OSError, match=r"(?i)processor.*" + str(tmp_path)):
        pipeline("image-to-text", model=str(tmp_path))


def test_model_directory_without_processor_names_the_missing_files(model_dir, tmp_path):
    """Not transformers' "Can't load image processor ... preprocessor_config.json" (a file hfcap never writes)."""
    _copy_model_without_processor(model_dir, tmp_path)
    missing = "it has no processor_config.json, tokenizer.json, tokenizer_config.json"
    with pytest.raises(FileNotFoundError, match=f"captioning processor from {tmp_path}: {missing}") as error:
        pipeline("image-to-text", model=str(tmp_path))
    assert "processor.save_pretrained" in str(error.value) and "preprocessor_config" not in str(error.value)
