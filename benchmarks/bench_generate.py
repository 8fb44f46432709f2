"""Caption generation speed of Show-Attend-Tell at the tutorial's full size: `python benchmarks/bench_generate.py`.

The model is `ShowAttendTellForConditionalGeneration(ShowAttendTellConfig())` (random ResNet-101 from timm, 256 px,
14x14 grid, attention/embedding/LSTM 512, 9490 words), in eval mode. On CUDA it times batches of 1/32/128 images in
float32 and bfloat16 (weights cast with `model.to(torch.bfloat16)`, and fp32 weights under `torch.autocast`); on the
CPU, batches of 1/4 in float32. Methods:
    greedy            generate(num_beams=1)
    greedy no-cache   generate(num_beams=1, use_cache=False): the LSTM reruns over the whole prefix at each step
    beam5 (HF)        generate(num_beams=5)
    beam5 reference   generate(num_beams=5, custom_generate=hfcap.reference_beam_search), one image at a time
Every time is the best of several runs after a warm-up, between `torch.cuda.synchronize()` calls; a run is one
`generate` call on the whole batch (the ResNet forward included). Random weights never learnt to end a caption, but
could still emit `<end>` early: the HF searches are forced to exactly 20 new tokens (`min_new_tokens=20`,
`max_new_tokens=20`) so every row decodes the same length. The reference search applies no logits processors (it
reproduces caption.py), so it runs with `max_new_tokens=20` alone; the table gives the tokens it actually decoded.
"""

import argparse
import contextlib
import time

import torch

import hfcap

IMAGE_SIZE = 256  # the SAT tutorial's processor
NEW_TOKENS = 20
METHODS = {
    "greedy": {"num_beams": 1, "min_new_tokens": NEW_TOKENS},
    "greedy no-cache": {"num_beams": 1, "min_new_tokens": NEW_TOKENS, "use_cache": False},
    "beam5 (HF)": {"num_beams": 5, "min_new_tokens": NEW_TOKENS},
    "beam5 reference": {"num_beams": 5, "custom_generate": hfcap.reference_beam_search},
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model, pixel_values, settings, autocast, min_seconds, max_runs):
    """Best wall time of one `generate` over the batch (after one warm-up run), and the new tokens per row."""
    device = pixel_values.device
    context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    times = []
    with context:
        sequences = model.generate(pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, **settings)  # warm-up
        synchronize(device)
        while len(times) < 2 or (sum(times) < min_seconds and len(times) < max_runs):
            start = time.perf_counter()
            sequences = model.generate(pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, **settings)
            synchronize(device)
            times.append(time.perf_counter() - start)
    new_tokens = (sequences[:, 1:] != model.config.pad_token_id).sum(1).float().mean().item()
    return min(times), new_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 32 128 on CUDA, 1 4 on the CPU")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each setting at least this long")
    parser.add_argument("--max-runs", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    batch_sizes = args.batch_sizes or ([1, 32, 128] if on_cuda else [1, 4])
    precisions = ["fp32", "bf16 weights", "bf16 autocast"] if on_cuda else ["fp32"]

    import timm
    import transformers

    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}"
    print(f"device: {name}; {versions}")
    if on_cuda:
        print(f"TF32: cuDNN convolutions {torch.backends.cudnn.allow_tf32}, matmuls "
              f"{torch.backends.cuda.matmul.allow_tf32} (PyTorch defaults); cudnn.benchmark "
              f"{torch.backends.cudnn.benchmark}")
    torch.manual_seed(0)
    config = hfcap.ShowAttendTellConfig()
    model = hfcap.ShowAttendTellForConditionalGeneration(config).eval().to(device)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"model: Show-Attend-Tell {config.backbone} (random init), {IMAGE_SIZE} px, decoder "
          f"{config.d_model}, vocab {config.vocab_size}, {parameters / 1e6:.1f}M parameters")
    print(f"{NEW_TOKENS} new tokens per caption (HF searches forced with min_new_tokens={NEW_TOKENS}); "
          "times: best of >= 2 runs after a warm-up\n")

    header = f"{'precision':<14}{'batch':>6}  {'method':<16}{'images/s':>10}{'ms/batch':>10}{'tokens':>8}"
    header += f"{'peak GiB':>10}"
    print(header)
    print("-" * len(header))
    for precision in precisions:
        model.to(torch.bfloat16 if precision == "bf16 weights" else torch.float32)
        for batch_size in batch_sizes:
            pixel_values = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
            seconds = {}
            for method, settings in METHODS.items():
                if on_cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    best, new_tokens = time_generate(
                        model, pixel_values, settings, precision == "bf16 autocast", args.min_seconds, args.max_runs
                    )
                except Exception as error:  # reported in the table, the other settings still run
                    print(f"{precision:<14}{batch_size:>6}  {method:<16}error: {type(error).__name__}: {error}")
                    continue
                seconds[method] = best
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:10.2f}" if on_cuda else f"{'-':>10}"
                print(f"{precision:<14}{batch_size:>6}  {method:<16}{batch_size / best:10.1f}{best * 1e3:10.1f}"
                      f"{new_tokens:8.1f}{peak}", flush=True)
            if "greedy" in seconds and "greedy no-cache" in seconds:
                print(f"{'':<20}  greedy no-cache / cached time: {seconds['greedy no-cache'] / seconds['greedy']:.2f}x")


if __name__ == "__main__":
    main()
