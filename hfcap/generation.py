"""Generation helpers shared by every architecture: `reference_beam_search` (each architecture's original, authors'
beam search, through `generate`), the EOS cut of generated sequences, and the decoding flags of the CLI.

Usage: `model.generate(pixel_values, num_beams=k, custom_generate=hfcap.reference_beam_search)`. transformers'
`generate` accepts a callable `custom_generate`: it prepares the inputs as usual (encoder run once, its outputs
repeated `max(num_beams, num_return_sequences)` times per image, generation config merged with the call's kwargs) and
then calls `custom_generate(model, input_ids, logits_processor=..., stopping_criteria=..., generation_config=...,
**model_kwargs)` in place of its own decoding loop. This function hands that call to the model's
`_reference_beam_search`, which lives in the model's modeling file so that it also works as Hub remote code.
"""


def reference_beam_search(
    model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **model_kwargs
):
    """
    Runs the authors' beam search of `model`'s architecture (Show-Attend-Tell: the tutorial's shrinking beam).

    Returns the best sequence per image (the `num_return_sequences` best with that argument) as a LongTensor padded
    with `pad_token_id`, or, with `return_dict_in_generate=True`, a ModelOutput with `sequences` and
    `sequences_scores`.
    """
    search = getattr(model, "_reference_beam_search", None)
    if search is None:
        raise TypeError(f"{type(model).__name__} has no reference (authors') beam search.")
    return search(
        input_ids,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        generation_config=generation_config,
        **model_kwargs,
    )


def eos_mask(tokens, eos_token_id):
    """`(mask, finished)` of generated `tokens (N, T)`: `mask (N, T)` is True up to and including the first EOS,
    `finished (N,)` True where an EOS occurs. The one EOS cut of evaluation, SCST and attention maps."""
    is_eos = tokens == eos_token_id
    eos_before = is_eos.long().cumsum(1) - is_eos.long()
    return eos_before == 0, is_eos.any(1)


def add_generation_arguments(parser) -> None:
    """The decoding flags of `hfcap caption` and `hfcap evaluate` (read back by `generate_kwargs_from_args`)."""
    from hfcap.cli import int_at_least

    parser.add_argument("--num-beams", type=int_at_least(1), help="beam size (default: the model's generation_config)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1),
                        help="caption length limit (default: the model's generation_config)")
    parser.add_argument("--reference-beam-search", action="store_true",
                        help="decode with the authors' own beam search (hfcap.reference_beam_search) instead of "
                             "Hugging Face's")


def generate_kwargs_from_args(args) -> dict:
    """`model.generate` keyword arguments from the flags of `add_generation_arguments` (unset flags left out)."""
    kwargs = {name: getattr(args, name) for name in ("num_beams", "max_new_tokens") if getattr(args, name) is not None}
    if args.reference_beam_search:
        kwargs["custom_generate"] = reference_beam_search
    return kwargs
