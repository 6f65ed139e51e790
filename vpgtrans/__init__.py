"""vpgtrans: move a visual prompt generator (VPG) from one multimodal LLM to another LLM."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(bundle_dir, **kwargs):
    """Assemble the ``VisionLanguageModel`` described by a bundle directory (see ``vpgtrans.bundle``)."""
    from vpgtrans.bundle import load_model as _load_model

    return _load_model(bundle_dir, **kwargs)
