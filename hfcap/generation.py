"""`reference_beam_search`: each architecture's original (authors') beam search, through `generate`.

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
