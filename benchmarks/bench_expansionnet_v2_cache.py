"""ExpansionNet v2 decoding with and without its decoder cache: `python benchmarks/bench_expansionnet_v2_cache.py`.

The authors' code recomputes the whole decoder prefix at every step (O(E L^2 d) per layer for an L-token caption);
hfcap's `ExpansionNetV2DecoderState` keeps the per-position tensors of §3 of the spec, so a step costs O(E L d).
This script times greedy `generate` on the CPU, one caption at a time, forced to exactly 10, 20 and 40 new tokens
(`min_new_tokens` = `max_new_tokens`; random weights would end captions at random lengths), with `use_cache=False`,
the growing cache (`use_cache=True`) and the static one (`cache_implementation="static"`: preallocated buffers,
every step over all of them; on a GPU its steps replay a CUDA graph). The model is features-only (the backbone runs
once per image either way, so it is left out): a mid-size body (d_model 256, d_ff 1024, 3 + 3 layers, the released
expansion sizes 32/64/128/256/512 and 16, 8 heads, 10,000 words) over 144 random visual tokens of width 1536. Each time is the best of several runs after a
warm-up. All three must produce the same tokens; the script checks it.

`--tiny`: a correctness run for CI (a few seconds, no timing): on a tiny model, the three give the same tokens and
per-step logits at every length, and the script exits non-zero otherwise.
"""

import argparse
import sys
import time

import torch

from hfcap.models.expansionnet_v2 import ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration

LENGTHS = (10, 20, 40)
CACHES = {"uncached": {"use_cache": False}, "cached": {"use_cache": True}, "static": {"cache_implementation": "static"}}
MID_SIZE = {
    "d_model": 256,
    "d_ff": 1024,
    "num_heads": 8,
    "num_encoder_layers": 3,
    "num_decoder_layers": 3,
    "static_expansion_groups": [32, 64, 128, 256, 512],
    "num_dynamic_expansions": 16,
    "vocab_size": 10000,
    "visual_feature_dim": 1536,
    "num_visual_tokens": 144,
}
TINY = {
    "d_model": 16,
    "d_ff": 32,
    "num_heads": 2,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "static_expansion_groups": [2, 4],
    "num_dynamic_expansions": 3,
    "vocab_size": 50,
    "visual_feature_dim": 24,
    "num_visual_tokens": 9,
}


def build(size, batch_size=1):
    """A random features-only model of `size` and `batch_size` images' random visual tokens."""
    settings = dict(size)
    num_visual_tokens = settings.pop("num_visual_tokens")
    config = ExpansionNetV2Config(
        use_backbone=False,
        max_position_embeddings=max(LENGTHS) + 1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        decoder_start_token_id=2,
        **settings,
    )
    torch.manual_seed(0)
    model = ExpansionNetV2ForConditionalGeneration(config).eval()
    features = torch.randn(batch_size, num_visual_tokens, config.visual_feature_dim)
    return model, features


def decode(model, features, length, cache, num_beams=1):
    return model.generate(
        visual_features=features,
        num_beams=num_beams,
        do_sample=False,
        min_new_tokens=length,
        max_new_tokens=length,
        output_logits=True,
        return_dict_in_generate=True,
        **CACHES[cache],
    )


def check(model, features):
    """The three settings agree at every length: tokens equal, step logits within 1e-5 of the uncached ones."""
    for length in LENGTHS:
        uncached = decode(model, features, length, "uncached")
        for cache in ("cached", "static"):
            output = decode(model, features, length, cache)
            if not torch.equal(output.sequences, uncached.sequences):
                raise AssertionError(
                    f"{length} tokens: {cache} {output.sequences.tolist()} != uncached {uncached.sequences.tolist()}"
                )
            difference = max((a - b).abs().max().item() for a, b in zip(output.logits, uncached.logits))
            if difference > 1e-5:
                raise AssertionError(f"{length} tokens: {cache} and uncached logits differ by {difference:.2e}")
            print(f"{length:>3} tokens: {cache} == uncached (max logit difference {difference:.1e})")


def best_time(model, features, length, cache, num_beams, min_seconds=0.5, max_runs=10):
    decode(model, features, length, cache, num_beams)  # warm-up
    times = []
    while len(times) < 2 or (sum(times) < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        decode(model, features, length, cache, num_beams)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="correctness check on a tiny model, no timing")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per generate call (default 1)")
    parser.add_argument("--num-beams", type=int, default=1, help="1: greedy (default), else HF beam search")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        if args.tiny:
            check(*build(TINY))
            return 0
        model, features = build(MID_SIZE, args.batch_size)
        check(model, features)
        search = "greedy decoding" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
        print(f"\n{search} of {args.batch_size} caption(s), CPU, {torch.get_num_threads()} threads, seconds per call")
        print(f"{'tokens':>6}  {'uncached':>9}  {'cached':>9}  {'speed-up':>8}  {'static':>9}  {'speed-up':>8}")
        for length in LENGTHS:
            uncached, cached, static = (best_time(model, features, length, cache, args.num_beams) for cache in CACHES)
            print(f"{length:>6}  {uncached:>9.4f}  {cached:>9.4f}  {uncached / cached:>7.1f}x  {static:>9.4f}  "
                  f"{uncached / static:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
