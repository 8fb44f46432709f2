"""CUDA checks of Show-Attend-Tell and of ExpansionNet v2's CUDA-graph decoding, run on a GPU machine:
`python benchmarks/check_cuda.py [--fixtures DIR]`.

Checks, each printed PASS/FAIL (exit status 1 if any fails):
  (a) a tiny model (timm `test_resnet` backbone) gives the same teacher-forced logits on CUDA as on the CPU (float32,
      1e-4; TF32 off so that CUDA computes true float32 products);
  (b) greedy, beam (HF) and reference (tutorial) beam search give identical token ids on the CPU and on CUDA;
  (c) the tutorial fixtures (sat/small, sat/small-b) on CUDA in float64: teacher-forced logits, alphas and losses
      within 1e-8 of `expected_fp64`, and the reference beam search's ids (and scores within 1e-8) for beams 1/3/5;
      in float32, the same within the case's tolerances;
  (d) bfloat16 on CUDA: `generate` runs (greedy, beam, reference beam) with the model cast to bfloat16;
  (e) ExpansionNet v2 (a mid-size random body on features) with `cache_implementation="static"`, whose decoding steps
      replay a captured CUDA graph: the same token ids as the dynamic cache for greedy, beam 3 and seeded sampling,
      scores (and greedy's cross-attention weights of every step) within 1e-4, in float32 (bfloat16: the share of
      equal sequences and the largest score difference are reported, since bf16 rounding can flip near-ties); a
      second call replays the same graph; a call under `torch.inference_mode` and one after it both work.

The fixtures are the repository's `../shared/fixtures/reference/sat` (as the tests read them); `--fixtures` points
elsewhere (e.g. a copy carried to the GPU machine). Needs neither `datasets` nor pytest.
"""

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import hfcap
from hfcap.models.expansionnet_v2 import ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration
from hfcap.models.show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures" / "reference" / "sat"
CASES = ["small", "small-b"]
BEAM_SIZES = [1, 3, 5]
FP64_TOLERANCE = 1e-8
FP32_TOLERANCES = {"logits": 5e-5, "alphas": 1e-6, "losses": 2e-5, "scores": 2e-5}  # case.json fp32_port_vs_expected
CPU_VS_CUDA_TOLERANCE = 1e-4

RESULTS = []


def report(name, passed, detail=""):
    RESULTS.append(passed)
    print(f"{'PASS' if passed else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)


def max_difference(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def tiny_model():
    """A random tiny SAT on timm's `test_resnet` (96 channels) for 32 px images, with output weights large enough
    that its captions depend on the image (as a trained model's would) and an `<end>` bias that ends them after
    about 5-13 tokens, so that the searches also finish hypotheses."""
    config = ShowAttendTellConfig(
        vocab_size=40, visual_feature_dim=96, attention_dim=16, embed_dim=16, d_model=16, encoder_grid_size=2,
        backbone="test_resnet", dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    model = ShowAttendTellForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.decoder.init_h.weight.normal_(std=0.5)
        model.decoder.fc.weight.normal_(std=2.0)
        model.decoder.fc.bias[config.eos_token_id] = 2.2
    return model


def check_cpu_vs_cuda(device):
    model_cpu = tiny_model()
    model_cuda = copy.deepcopy(model_cpu).to(device)
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(4, 3, 32, 32, generator=generator)
    decoder_input_ids = torch.randint(3, 40, (4, 7), generator=generator)
    decoder_input_ids[:, 0] = 1
    with torch.no_grad():
        cpu = model_cpu(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, output_attentions=True)
        cuda = model_cuda(
            pixel_values=pixel_values.to(device), decoder_input_ids=decoder_input_ids.to(device), output_attentions=True
        )
    for name, a, b in [
        ("logits", cpu.logits, cuda.logits),
        ("alphas", cpu.cross_attentions[0], cuda.cross_attentions[0]),
        ("annotation vectors", cpu.encoder_last_hidden_state, cuda.encoder_last_hidden_state),
    ]:
        difference = max_difference(a, b)
        report(f"(a) tiny model teacher-forced {name}, cpu vs {device} fp32", difference <= CPU_VS_CUDA_TOLERANCE,
               f"max |diff| {difference:.2e} (tol {CPU_VS_CUDA_TOLERANCE:g})")

    settings = {
        "greedy": {"num_beams": 1, "do_sample": False},
        "beam5 (HF)": {"num_beams": 5, "do_sample": False},
        "beam5 num_return_sequences=3 (HF)": {"num_beams": 5, "num_return_sequences": 3, "do_sample": False},
        "reference beam 3": {"num_beams": 3, "custom_generate": hfcap.reference_beam_search},
    }
    for name, kwargs in settings.items():
        ids_cpu = model_cpu.generate(pixel_values=pixel_values, max_new_tokens=15, **kwargs)
        ids_cuda = model_cuda.generate(pixel_values=pixel_values.to(device), max_new_tokens=15, **kwargs)
        same = ids_cpu.shape == ids_cuda.shape and torch.equal(ids_cpu, ids_cuda.cpu())
        lengths = (ids_cpu != model_cpu.config.pad_token_id).sum(1).tolist()
        report(f"(b) tiny model generate {name}: identical ids cpu vs {device}", same,
               f"shape {tuple(ids_cpu.shape)} vs {tuple(ids_cuda.shape)}, non-pad tokens per row {lengths}")


def tutorial_model(case_dir):
    """The fixture's tutorial checkpoint converted by `hfcap.convert_checkpoint` (a features-only model)."""
    with tempfile.TemporaryDirectory() as output_dir:
        hfcap.convert_checkpoint("show-attend-tell", case_dir / "checkpoint.pth.tar", case_dir / "WORDMAP.json", output_dir)
        return ShowAttendTellForConditionalGeneration.from_pretrained(output_dir).eval()


def check_fixture(case_dir, device, dtype):
    """As tests/test_show_attend_tell_parity.py, on `device`: the fixture's captions, mapped onto our inputs."""
    label = f"{case_dir.name} {device} {str(dtype).removeprefix('torch.')}"
    tolerances = (
        dict.fromkeys(FP32_TOLERANCES, FP64_TOLERANCE) if dtype == torch.float64 else FP32_TOLERANCES
    )
    inputs = load_file(case_dir / "inputs.safetensors")
    expected = load_file(case_dir / ("expected_fp64.safetensors" if dtype == torch.float64 else "expected.safetensors"))
    captions = inputs["encoded_captions"]  # <start> w... <end> <pad>...
    decode_lengths = inputs["caption_lengths"].squeeze(1) - 1  # the tutorial decodes caplen - 1 steps
    steps = int(decode_lengths.max())
    labels = captions[:, 1 : steps + 1].clone()
    labels[torch.arange(steps) >= decode_lengths[:, None]] = -100
    features = inputs["encoder_out"].flatten(1, 2).to(device, dtype)  # (B, 14, 14, D) -> (B, 196, D)
    model = tutorial_model(case_dir).to(device, dtype)

    with torch.no_grad():
        output = model(visual_features=features, labels=labels.to(device), output_attentions=True)
    sort_ind = expected["sort_ind"]  # the tutorial reorders the batch by caption length
    real_steps = torch.arange(steps) < expected["decode_lengths"][:, None]
    compared = {
        "logits": (output.logits.cpu()[sort_ind][real_steps], expected["predictions"][real_steps]),
        "alphas": (output.cross_attentions[0][:, 0].cpu()[sort_ind][real_steps], expected["alphas"][real_steps]),
        "loss_ce": (output.loss_ce, expected["loss_ce"]),
        "loss_doubly_stochastic": (output.loss_doubly_stochastic, expected["loss_doubly_stochastic"]),
        "loss": (output.loss, expected["loss"]),
    }
    for name, (ours, theirs) in compared.items():
        tolerance = tolerances["losses" if name.startswith("loss") else name]
        difference = max_difference(ours, theirs)
        report(f"(c) {label} teacher-forced {name}", difference <= tolerance,
               f"max |diff| {difference:.2e} (tol {tolerance:g})")

    for beam_size in BEAM_SIZES:
        search = model.generate(
            visual_features=features,
            num_beams=beam_size,
            custom_generate=hfcap.reference_beam_search,
            return_dict_in_generate=True,
        )
        sequences = search.sequences.cpu()
        same_ids, worst_score = True, 0.0
        for image in range(features.shape[0]):
            sequence = expected[f"beam{beam_size}_seq_{image}"]
            row = sequences[image]
            same_ids &= row[: len(sequence)].tolist() == sequence.tolist()
            same_ids &= bool((row[len(sequence) :] == model.config.pad_token_id).all())
            worst_score = max(
                worst_score, max_difference(search.sequences_scores[image], expected[f"beam{beam_size}_score_{image}"])
            )
        report(f"(c) {label} reference beam {beam_size}: caption.py's ids", same_ids)
        report(f"(c) {label} reference beam {beam_size}: scores", worst_score <= tolerances["scores"],
               f"max |diff| {worst_score:.2e} (tol {tolerances['scores']:g})")


def check_bfloat16(device):
    model = tiny_model().to(device, torch.bfloat16)
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    for name, kwargs in {
        "greedy": {"num_beams": 1},
        "beam5 (HF)": {"num_beams": 5},
        "reference beam 5": {"num_beams": 5, "custom_generate": hfcap.reference_beam_search},
    }.items():
        try:
            ids = model.generate(pixel_values=pixel_values, max_new_tokens=10, **kwargs)
            report(f"(d) bfloat16 generate {name} on {device}", ids.shape[0] == 4, f"shape {tuple(ids.shape)}")
        except Exception as error:  # reported, not raised: the other checks still run
            report(f"(d) bfloat16 generate {name} on {device}", False, f"{type(error).__name__}: {error}")


def check_expansionnet_v2_static(device):
    config = ExpansionNetV2Config(
        use_backbone=False, visual_feature_dim=64, d_model=64, num_heads=4, d_ff=128, num_encoder_layers=2,
        num_decoder_layers=3, static_expansion_groups=[4, 8], num_dynamic_expansions=16, vocab_size=300,
        max_position_embeddings=30, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    model = ExpansionNetV2ForConditionalGeneration(config).eval().to(device)
    features = torch.randn(6, 20, 64, generator=torch.Generator().manual_seed(3)).to(device)
    searches = {"greedy": {"output_attentions": True}, "beam 3": {"num_beams": 3},
                "sampling": {"do_sample": True, "top_k": 0}}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        label = f"(e) ExpansionNet v2 static cache, {str(dtype).removeprefix('torch.')}"
        for name, search in searches.items():
            settings = dict(visual_features=features.to(dtype), min_new_tokens=12, max_new_tokens=12,
                            return_dict_in_generate=True, output_scores=True, **search)
            try:
                torch.manual_seed(0)
                dynamic = model.generate(**settings)
                runs = []
                for _ in range(2):
                    torch.manual_seed(0)
                    runs.append(model.generate(**settings, cache_implementation="static"))
                    runs[-1].graph = model._static_decoder_state.graph
            except Exception as error:  # reported, not raised: the other checks still run
                report(f"{label} {name}", False, f"{type(error).__name__}: {error}")
                continue
            captured = runs[0].graph is not None or not device.startswith("cuda")
            report(f"{label} {name}: graph captured once and replayed by the second call",
                   captured and runs[1].graph is runs[0].graph)
            for index, static in enumerate(runs):
                same = (static.sequences == dynamic.sequences).all(dim=1).float().mean().item()
                worst = max((a.float() - b.float()).nan_to_num(0.0, 0.0, 0.0).abs().max().item()
                            for a, b in zip(static.scores, dynamic.scores))
                if search.get("output_attentions"):  # every step's own weights, not the last step's
                    worst = max([worst] + [(a.float() - b.float()).abs().max().item() for step_a, step_b in zip(
                        static.cross_attentions, dynamic.cross_attentions) for a, b in zip(step_a, step_b)])
                passed = dtype == torch.bfloat16 or (same == 1.0 and worst <= 1e-4)
                report(f"{label} {name}, call {index + 1}: static (graph) vs dynamic cache", passed,
                       f"equal sequences {same:.0%}, max |diff| of scores (and attentions) {worst:.1e}")
    model.float()
    settings = dict(visual_features=features, min_new_tokens=12, max_new_tokens=12, cache_implementation="static")
    with torch.inference_mode():
        under_inference_mode = model.generate(**settings)
    report("(e) ExpansionNet v2 static cache: a call under inference_mode, then a plain call",
           torch.equal(model.generate(**settings), under_inference_mode))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="folder with small/ and small-b/")
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU (cpu: a dry run)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (pass --device cpu for a dry run)")
        return 2
    # True float32 on CUDA: TF32 convolutions/matmuls (cuDNN's default for convolutions) round inputs to 10 bits.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""))
    check_cpu_vs_cuda(args.device)
    for case in CASES:
        for dtype in (torch.float64, torch.float32):
            check_fixture(args.fixtures / case, args.device, dtype)
    check_bfloat16(args.device)
    check_expansionnet_v2_static(args.device)
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
