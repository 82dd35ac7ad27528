"""The multimodal LLM workbench: load vision-language models, trace them, analyse and slim them down."""

__version__ = "0.1.0"
