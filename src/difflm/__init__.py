"""difflm: train, sample and evaluate diffusion language models."""

__version__ = "0.1.0"

from .errors import DiffLMError  # noqa: E402


def __getattr__(name):  # lazy: `import difflm` stays cheap for the CLI
    if name == "DiffusionLM":
        from .pipeline import DiffusionLM

        return DiffusionLM
    raise AttributeError(name)


__all__ = ["DiffLMError", "DiffusionLM", "__version__"]
