"""What differs between the transformers releases hfcap supports, in one place.

The supported range is declared in `pyproject.toml` and tested at both ends (`make test` on the lock, `make
test-floor` on the oldest releases). Every difference inside it is handled here:

- **The decoder cache's name.** transformers 5.25 renamed `past_key_values` to `cache`: `generate` passes
  `forward(..., cache=...)` and reads `outputs["cache"]`, and `Seq2SeqLMOutput` has a `cache` field instead of
  `past_key_values`. Models accept both names (`resolve_cache`) and return their cache under `CACHE_NAME`, the field
  the running transformers reads.
- **The "image-to-text" task.** Newer releases (5.23) rewrite the removed task to "image-text-to-text" before their
  registry lookup and log the rewrite with a malformed record; 5.17 rejects the name unless the registry declares it
  an alias (`declare_image_to_text_alias`, `StrayWarningCategoryFilter`).
- **Several captions per image in that pipeline.** 5.23 groups the generated sequences per image, `(B, k, L)`; 5.17
  returns `(B * k, L)` and its postprocess keeps only the first caption of each image (`sequences_per_image`).

Model folders are shipped as Hub remote code and must not import hfcap, so each modeling file carries a copy of the
pieces it needs, marked `# Copied from hfcap.compat.<name>`; `tests/test_copies.py` keeps the copies identical.
"""

import logging

from transformers.modeling_outputs import Seq2SeqLMOutput

CACHE_NAME = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"
"""The decoder cache's argument and output-field name in the running transformers ("cache" from 5.25 on)."""


def resolve_cache(cache=None, past_key_values=None):
    """The decoder cache passed to `forward` under either name (`cache`, or `past_key_values` before transformers
    5.25); passing two different objects is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the decoder cache as `cache` or as `past_key_values` (its name before transformers "
                         "5.25), not both.")
    return cache if cache is not None else past_key_values



def declare_image_to_text_alias(registry) -> None:
    """Make the pipeline `registry` resolve "image-to-text" to "image-text-to-text" on releases that have no rewrite
    of their own (on the others the alias is never consulted)."""
    registry.task_aliases.setdefault("image-to-text", "image-text-to-text")


class StrayWarningCategoryFilter(logging.Filter):
    """Drops the `UserWarning` class that transformers 5.23 passes as the %-format argument of its "image-to-text"
    deprecation message (`warning_once(message, UserWarning)`), so that the record formats (otherwise a "--- Logging
    error ---" traceback on stderr, and an exception under pytest); the message is kept."""

    def filter(self, record):
        if record.args == (UserWarning,):
            record.args = ()
        return True


def sequences_per_image(sequences, num_images: int):
    """The image-text-to-text pipeline's generated sequences as `(num_images, k, L)`, whether the running
    transformers grouped them per image already (5.23) or returns them flat, `(num_images * k, L)` (5.17)."""
    if sequences.ndim == 2 and sequences.shape[0] > num_images:
        return sequences.reshape(num_images, -1, sequences.shape[-1])
    return sequences
