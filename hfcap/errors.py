"""hfcap's error types. Each is a `ValueError` (something given is invalid) or an `OSError` (something cannot be read,
written or reached), names the input, and keeps the library error it replaces as `__cause__`. The others live next to
what raises them: `hfcap.processing.ImageLoadError` (an image) and `hfcap.conversion.CheckpointError` (an authors'
checkpoint or vocabulary).
"""

from contextlib import contextmanager

from huggingface_hub.errors import StrictDataclassError


class ConfigurationError(ValueError):
    """A model configuration with an invalid value (type, range, or a combination the architecture cannot build)."""


class ModelDirectoryError(ValueError):
    """A directory that is not a complete, consistent hfcap model (config, weights, processor)."""


class RemoteFileError(OSError):
    """A URL that could not be fetched (unreachable, timed out, an HTTP error)."""


@contextmanager
def configuration_errors(where: str):
    """Turn huggingface_hub's config validation errors (not `ValueError`s) into a `ConfigurationError` naming `where`."""
    try:
        yield
    except StrictDataclassError as error:
        raise ConfigurationError(f"{where}: {' '.join(str(error).split())}") from error


__all__ = ["ConfigurationError", "ModelDirectoryError", "RemoteFileError", "configuration_errors"]
