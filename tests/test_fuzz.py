"""Bad input never crashes hfcap or passes silently: a seeded fuzz run over every public entry point.

Each family of bad input (a class of inputs, not one case) is drawn with a seeded generator and driven through the
entry points that take it: the processor and tokenizer, the models' `forward` / `generate` / reference search (every
architecture), hfcap's loader, the converters, the pipeline and every CLI subcommand. Every case must end, within a
time bound, in one of hfcap's documented error types (a `ValueError`/`TypeError` for an invalid input, an `OSError`
for something unreadable or unreachable — `ImageLoadError`, `CheckpointError`, `ModelDirectoryError`,
`ConfigurationError`, `RemoteFileError` among them) whose message names the input; nothing refused may return a
result; CLI cases print exactly one line on stderr and exit non-zero.
"""

import contextlib
import json
import os
import signal
import socket
import threading

import numpy as np
import pytest
import torch
from conftest import SAT_FIXTURES, save_tiny_captioner
from model_testers import TESTERS
from PIL import Image

from hfcap.cli import main
from hfcap.conversion import convert_checkpoint
from hfcap.generation import reference_beam_search
from hfcap.loading import load_captioner
from hfcap.processing import CaptioningProcessor, build_word_level_tokenizer, make_image_processor
from hfcap.processing.tokenization import tokenizer_from_vocabulary

SEED = 20261205
TIME_LIMIT = 20  # seconds any one case may take
DOCUMENTED = (ValueError, TypeError, OSError)


@contextlib.contextmanager
def time_bound(seconds=TIME_LIMIT):
    """Fail the case instead of hanging (SIGALRM: the tests run in the main thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"the case did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(call, *names):
    """Run `call()`: it must raise a documented error (not TimeoutError) whose message names one of `names`."""
    with time_bound():
        with pytest.raises(DOCUMENTED) as caught:
            result = call()
            pytest.fail(f"accepted a bad input and returned {type(result).__name__}")
    assert not isinstance(caught.value, TimeoutError), "the case hung"
    message = str(caught.value)
    assert any(name.lower() in message.lower() for name in names), f"{message!r} names none of {names}"
    return caught.value


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture(scope="module")
def processor():
    return CaptioningProcessor(make_image_processor(32), build_word_level_tokenizer(["a dog on a beach"], 1))


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"))


# --- images and text through the processor ---------------------------------------------------------------------------


def test_processor_refuses_bad_images(processor, rng, tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    truncated = tmp_path / "truncated.png"
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: int(rng.integers(10, 60))])
    nan_image = Image.fromarray(rng.normal(size=(8, 8)).astype(np.float32), mode="F")
    nan_image.putpixel((int(rng.integers(8)), int(rng.integers(8))), float(rng.choice([np.nan, np.inf, -np.inf])))
    cases = [
        (7, "images"), ({"image": 1}, "images"), ([], "empty"), (None, "needs at least one"),
        (str(fifo), "not a regular file"), (str(truncated), str(truncated)), (str(tmp_path / "absent.png"), "not found"),
        (Image.new("RGB", (0, 0)), "no pixels"), (nan_image, "NaN or infinite"),
        (rng.random((9, 9, 3)), "dtype"), (rng.integers(0, 256, (9, 9, 5), dtype=np.uint8), "shape"),
        (torch.zeros(2, 9, 9, dtype=torch.uint8), "shape"),
    ]
    for images, name in cases:
        refused(lambda: processor(images=images), name)
    big = Image.new("RGB", (64, 64))
    limited = CaptioningProcessor(processor.image_processor, processor.tokenizer, max_image_pixels=1000)
    refused(lambda: limited(images=big), "max_image_pixels")
    assert processor(images=Image.new("La", (5, 5)))["pixel_values"].shape == (1, 3, 32, 32)  # a rare mode works


def test_processor_refuses_bad_text_and_ids(processor, rng):
    unknown = "".join(chr(int(code)) for code in rng.integers(0x4E00, 0x4E80, 3))
    for text, name in [([None], "text[0]"), (["a", 3], "text[1]"), (["a \ud800 dog"], "unicode"),
                       (f"a {unknown}", "not in the vocabulary"), ({"a": 1}, "text")]:
        refused(lambda: processor(text=text), name)
    refused(lambda: processor(text_target=[b"a dog"]), "text_target[0]")
    vocab = len(processor.tokenizer)
    for ids, name in [(None, "sequence of token ids"), ("a dog", "sequence of token ids"),
                      ([1, int(rng.integers(vocab, 10 * vocab))], "outside the vocabulary"), ([1, -7], "outside")]:
        refused(lambda: processor.decode(ids), name)
    for value in ("abc", -1, 0, 2.5, True):
        refused(lambda: CaptioningProcessor(processor.image_processor, processor.tokenizer,
                                            max_caption_length=value), "max_caption_length")


def test_tokenizer_builders_refuse_bad_vocabularies():
    specials = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    for tokens, name in [(["<pad>", "<bos>", "<eos>", "<unk>", 7], "entry 4"),
                         (["<pad>", "<bos>", "<eos>", "<unk>", None], "entry 4"),
                         (["<pad>", "<bos>", "<eos>", "<unk>", ""], "entry 4"),
                         (["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"], "duplicate"),
                         (["<pad>", "<bos>", "<eos>", "a"], "special tokens not in the vocabulary")]:
        refused(lambda: tokenizer_from_vocabulary(tokens, **specials), name)


# --- saved model directories through hfcap's loader -------------------------------------------------------------------


def _copy(source, target, **replace):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(replace.get(path.name, path.read_bytes()))
    return target


def test_loader_refuses_bad_model_directories(captioner_dir, rng, tmp_path):
    config = json.loads((captioner_dir / "config.json").read_text())
    weights = (captioner_dir / "model.safetensors").read_bytes()
    cut = int(rng.integers(200, len(weights) - 200))
    cases = [
        (tmp_path / "absent", "not found"),
        (captioner_dir / "config.json", "not a directory"),
        (_copy(captioner_dir, tmp_path / "damaged", **{"model.safetensors": weights[:cut]}), "weights"),
        (_copy(captioner_dir, tmp_path / "garbage", **{"model.safetensors": rng.bytes(4096)}), "weights"),
        (_copy(captioner_dir, tmp_path / "bert", **{"config.json": json.dumps({"model_type": "bert"}).encode()}),
         "'bert'"),
        (_copy(captioner_dir, tmp_path / "other", **{"config.json": json.dumps(
            {**config, "model_type": "m2_transformer"}).encode()}), "weights"),
        (_copy(captioner_dir, tmp_path / "resized", **{"config.json": json.dumps(
            {**config, "d_model": config["d_model"] * 2}).encode()}), "wrong size"),
        (_copy(captioner_dir, tmp_path / "broken_json", **{"config.json": b"{not json"}), "not valid JSON"),
        (_copy(captioner_dir, tmp_path / "bad_value", **{"config.json": json.dumps(
            {**config, "dropout": "lots"}).encode()}), "config"),
    ]
    (tmp_path / "features_only").mkdir()
    for directory, name in cases:
        refused(lambda: load_captioner(directory), name, str(directory))
    features_only = tmp_path / "features_only_weights"
    model, processor = load_captioner(captioner_dir)
    model.config.use_backbone = False
    type(model)(model.config).save_pretrained(features_only)  # weights without the backbone ...
    processor.save_pretrained(features_only)
    config_with_backbone = {**json.loads((features_only / "config.json").read_text()), "use_backbone": True}
    (features_only / "config.json").write_text(json.dumps(config_with_backbone))  # ... a config that wants one
    refused(lambda: load_captioner(features_only), "missing from the weights")


# --- converters -----------------------------------------------------------------------------------------------------


def test_converters_refuse_bad_checkpoints_and_settings(rng, tmp_path):
    checkpoint, vocab = SAT_FIXTURES / "small" / "checkpoint.pth.tar", SAT_FIXTURES / "small" / "WORDMAP.json"
    noise = tmp_path / "noise.pth"
    noise.write_bytes(rng.bytes(int(rng.integers(10, 5000))))
    cases = [
        (("show-attend-tell", noise, vocab), {}, "noise.pth", "noise.pth"),
        (("show-attend-tell", checkpoint, noise), {}, "noise.pth", "noise.pth"),
        (("m2-transformer", checkpoint, vocab), {}, "checkpoint.pth.tar", "WORDMAP.json"),
        (("expansionnet-v2", checkpoint, vocab), {}, "checkpoint.pth.tar", "WORDMAP.json"),
        (("show-attend-tell", checkpoint, vocab), {"image_size": int(rng.integers(-5, 1))}, "image_size", "image_size"),
        (("show-attend-tell", checkpoint, vocab), {"num_beams": int(rng.integers(-3, 1))}, "num_beams", "num_beams"),
        (("show-attend-tell", checkpoint, vocab), {"max_new_tokens": 10**9}, "max_new_tokens", "max_new_tokens"),
        (("show-attend-tell", checkpoint, vocab), {"num_heads": 4}, "num_heads", "num_heads"),
        (("show-and-tell", checkpoint, vocab), {}, "show-and-tell", "show-and-tell"),
    ]
    for arguments, overrides, *names in cases:
        refused(lambda: convert_checkpoint(*arguments, tmp_path / "out", **overrides), *names)
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- the pipeline ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stalled_server():
    """An http server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    connections = []
    thread = threading.Thread(target=lambda: connections.append(server.accept()), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/image.png"
    finally:
        server.close()


def test_pipeline_refuses_bad_inputs_and_does_not_hang(captioner_dir):
    from transformers import pipeline

    captioner = pipeline("image-to-text", model=str(captioner_dir))
    refused(lambda: captioner([]), "needs images")
    refused(lambda: captioner({"picture": "x.png"}), "'images' key")
    refused(lambda: captioner(7), "image type", "images")
    with stalled_server() as url:
        refused(lambda: captioner(url, timeout=1), url)
    refused(lambda: captioner("http://127.0.0.1:9/closed.png", timeout=1), "closed.png")
    refused(lambda: captioner(Image.new("RGB", (8, 8)), generate_kwargs={"max_new_tokens": 10**9}), "max_new_tokens")


# --- the models, every architecture ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TESTERS, ids=[tester.name for tester in TESTERS])
def tester(request):
    return request.param


def _bad_visual_inputs(tester, rng):
    """(kwargs, name in the message) of the bad-visual-input families for this architecture."""
    cases = []
    features = tester.feature_inputs()["visual_features"]
    where = tuple(int(rng.integers(size)) for size in features.shape)
    for value in (np.nan, np.inf, -np.inf, 1e30):
        corrupt = features.clone()
        corrupt[where] = value
        cases.append(({"visual_features": corrupt}, "visual_features"))
    cases += [
        ({"visual_features": features[:, :0]}, "visual_features"),
        ({"visual_features": features[:0]}, "visual_features"),
        ({"visual_features": features[..., : int(rng.integers(1, features.shape[-1]))]}, "visual_features"),
        ({"visual_features": features.numpy()}, "visual_features"),
        ({"visual_features": features.tolist()}, "visual_features"),
        ({"visual_features": torch.empty(features.shape, device="meta")}, "visual_features"),
        ({"visual_features": features, "visual_attention_mask": torch.zeros(features.shape[:2], dtype=torch.long)},
         "visual_attention_mask"),
        ({"visual_features": features, "visual_attention_mask": torch.ones(features.shape[0], 1)},
         "visual_attention_mask"),
        ({}, "exactly one"),
    ]
    if tester.has_pixels:
        pixels = tester.pixel_values()
        for value in (np.nan, np.inf, 1e30):
            corrupt = pixels.clone()
            corrupt[tuple(int(rng.integers(size)) for size in pixels.shape)] = value
            cases.append(({"pixel_values": corrupt}, "pixel_values"))
        for dtype in (torch.uint8, torch.int64, torch.bool, torch.complex64):
            cases.append(({"pixel_values": pixels.to(dtype)}, "pixel_values"))
        cases += [
            ({"pixel_values": pixels.numpy()}, "pixel_values"),
            ({"pixel_values": pixels[:0]}, "pixel_values"),
            ({"pixel_values": pixels[:, :, :2, :2]}, "pixel_values"),  # smaller than the backbone can see
            ({"pixel_values": pixels, "visual_features": features}, "exactly one"),
        ]
    return cases


@pytest.mark.parametrize("draw", range(3))
def test_models_refuse_bad_visual_inputs(tester, draw):
    """Three seeded draws of every family (where the bad value sits, how wide a wrong width is, ...)."""
    rng = np.random.default_rng(SEED + draw)
    model = tester.model()
    ids = torch.full((2, 1), model.config.decoder_start_token_id)
    for kwargs, name in _bad_visual_inputs(tester, rng):
        refused(lambda: model(**kwargs, decoder_input_ids=ids), name)
        refused(lambda: model.generate(**kwargs, max_new_tokens=3), name)
        refused(lambda: model.generate(**kwargs, num_beams=2, max_new_tokens=3,
                                       custom_generate=reference_beam_search), name)


@pytest.mark.parametrize("draw", range(3))
def test_models_refuse_bad_token_ids_and_settings(tester, draw):
    rng = np.random.default_rng(SEED + draw)
    model = tester.model()
    features = tester.feature_inputs()["visual_features"]
    vocab = model.config.vocab_size
    start = model.config.decoder_start_token_id
    batch = features.shape[0]
    for ids, name in [
        (torch.tensor([[start, int(rng.integers(vocab, 10 * vocab))]] * batch), "outside the vocabulary"),
        (torch.tensor([[start, -int(rng.integers(1, 5))]] * batch), "outside the vocabulary"),
        (torch.full((batch, 2), float(start)), "integer"),
        (torch.zeros(batch, 0, dtype=torch.long), "decoder_input_ids"),
        (torch.full((batch + 1, 1), start), "batch size"),
    ]:
        refused(lambda: model(visual_features=features, decoder_input_ids=ids), "decoder_input_ids", name)
    refused(lambda: model(visual_features=features, labels=torch.full((batch, 3), -100)), "labels")
    for settings, name in [({"max_new_tokens": 10**9}, "max_new_tokens"), ({"max_length": 10**9}, "max_length"),
                           ({"num_beams": vocab + 1, "custom_generate": reference_beam_search}, "num_beams")]:
        refused(lambda: model.generate(visual_features=features, **settings), name)
    wrong_width = model.get_encoder()(visual_features=features)
    wrong_width["last_hidden_state"] = wrong_width.last_hidden_state[..., :-1]
    refused(lambda: model(encoder_outputs=wrong_width, decoder_input_ids=torch.full((batch, 1), start)),
            "encoder_outputs", "last_hidden_state", "width")


# --- every CLI subcommand --------------------------------------------------------------------------------------------


def test_every_subcommand_answers_bad_input_with_one_line(captioner_dir, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30), "red").save(image)
    (tmp_path / "existing_file").write_text("x")
    (tmp_path / "bad.yaml").write_text("stages: [{name: xe, lr: fast}]")
    unwritable = tmp_path / "existing_file"  # a file where a folder must go: unwritable even for root
    sat = SAT_FIXTURES / "small"
    features_only = tmp_path / "features_only"
    model, processor = load_captioner(captioner_dir)
    model.config.use_backbone = False
    type(model)(model.config).save_pretrained(features_only)
    processor.save_pretrained(features_only)
    capsys.readouterr()  # the set-up's progress bars
    cases = [
        ["caption", str(image), "--model", str(features_only)],  # a model without a backbone cannot take images
        ["caption", str(image), "--model", str(tmp_path / "absent")],
        ["caption", str(tmp_path / "absent.png"), "--model", str(captioner_dir)],
        ["caption", str(image), "--model", str(captioner_dir), "--max-new-tokens", str(10**9)],
        ["caption", str(image), "--model", str(captioner_dir), "--batch-size", "0"],
        ["caption", str(image), "--model", str(captioner_dir), "--attention-map", str(unwritable / "sub" / "x.png")],
        ["convert", "show-attend-tell", "--checkpoint", str(sat / "checkpoint.pth.tar"), "--vocab",
         str(sat / "WORDMAP.json"), "--output", str(tmp_path / "existing_file")],
        ["convert", "show-attend-tell", "--checkpoint", str(image), "--vocab", str(sat / "WORDMAP.json"),
         "--output", str(tmp_path / "converted")],
        ["evaluate", "--model", str(captioner_dir), "--output", str(tmp_path / "ev"), "--data", "folder"],
        ["train", "--config", str(tmp_path / "bad.yaml")],
        ["train", "--config", str(tmp_path / "absent.yaml")],
        ["push", str(captioner_dir), "--repo-id", "org/x"],
        ["data", "inspect", "--data", "folder", "--folder", str(tmp_path / "absent")],
    ]
    for argv in cases:
        with time_bound():
            code = main(argv)
        error = capsys.readouterr().err
        assert code not in (0, None), argv
        lines = error.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"hfcap {argv[0]}: error: "), (argv, error)
    for argv in (["data", "scenes", "--output", str(tmp_path / "s"), "--train", "-1"],
                 ["evaluate", "--model", str(captioner_dir), "--output", "x", "--max-images", "0"]):
        with pytest.raises(SystemExit) as exited:  # argparse's own one-line usage error
            main(argv)
        assert exited.value.code == 2 and "error:" in capsys.readouterr().err
