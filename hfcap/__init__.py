"""hfcap: landmark image-captioning models as faithful Hugging Face models."""

__version__ = "0.1.0"
