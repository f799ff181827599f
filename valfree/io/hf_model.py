"""A Hugging Face ``checkpoint-N/`` folder as a model, rebuilt through transformers from its config."""

from __future__ import annotations

from torch import nn

from ..errors import ValfreeError
from .checkpoints import load_into


def build_hf_model(folder: str) -> nn.Module:
    """A Hugging Face checkpoint folder as a model, through transformers (safetensors weights only)."""
    try:
        import transformers
    except ImportError:
        raise ValfreeError(
            f"{folder} is a Hugging Face checkpoint; install transformers (pip install 'valfree[huggingface]') "
            "or pass --model MODULE:FACTORY."
        ) from None
    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValfreeError(f"{folder}/config.json names no architecture transformers knows ({arch!r}); pass --model.")
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return load_into(model, folder)
