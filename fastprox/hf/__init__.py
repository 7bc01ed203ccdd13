"""Hugging Face: the export stock transformers loads (``export.py``, with the modeling file it
writes, ``modeling.py``) and the Trainer callback (``trainer.py``: ``SparsityCallback``,
``attach``). transformers is imported only by what needs it."""

from .export import save_pretrained_compact

__all__ = ["save_pretrained_compact", "SparsityCallback", "attach"]


def __getattr__(name):
    if name in ("SparsityCallback", "attach"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fastprox.hf' has no attribute {name!r}")
