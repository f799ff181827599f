"""valfree: model selection without validation labels.

The head-gradient probe picks checkpoints and stops training early; test prediction variance (TPV)
measures how far predictions move under quantization, pruning, SGD or label noise; JBR prunes channels
without labels. Every name below loads on first use, so that ``import valfree`` (and the ``valfree``
command's ``--help``) does not wait for torch.
"""

from __future__ import annotations

import importlib

from .errors import ValfreeError

__version__ = "0.1.0"

# name -> (module, attribute); attribute None means the module itself.
_LAZY = {
    "Head": ("valfree.probes", "Head"),
    "HeadGradient": ("valfree.probes", "HeadGradient"),
    "find_head": ("valfree.probes", "find_head"),
    "head_gradient_from_features": ("valfree.probes", "head_gradient_from_features"),
    "EarlyStopping": ("valfree.selection", "EarlyStopping"),
    "Selection": ("valfree.selection", "Selection"),
    "correlations": ("valfree.selection", "correlations"),
    "gap_to_oracle": ("valfree.selection", "gap_to_oracle"),
    "select_checkpoint": ("valfree.selection", "select_checkpoint"),
    "tpv": ("valfree.tpv", None),  # the package is callable: valfree.tpv(model, x, noise)
    "tpv_stability": ("valfree.tpv", "tpv_stability"),
    "noise": ("valfree.tpv.noise", None),
    "prune": ("valfree.pruning", "prune"),
    "Monitor": ("valfree.integrations.monitor", "Monitor"),
    "lightning": ("valfree.lightning", None),
    "huggingface": ("valfree.huggingface", None),
}

__all__ = ["ValfreeError", "head_gradient", *_LAZY]

_warned_pseudo = False


def _head_gradient():
    """:func:`valfree.probes.head_gradient`, which warns once when ``targets`` is not given.

    Without targets the probe uses the model's own argmax as pseudo-labels. That is a choice a user
    should make knowingly (the probe with labels is the one the selection rule was measured with), so
    the facade asks for ``targets="pseudo"`` by name; a later version will require ``targets``.
    """
    import functools
    import warnings

    from .probes import head_gradient

    @functools.wraps(head_gradient)
    def wrapper(model, inputs, targets=None, *args, **kwargs):
        global _warned_pseudo
        if targets is None and not _warned_pseudo:
            _warned_pseudo = True
            warnings.warn(
                "head_gradient(model, inputs) without targets uses the model's own argmax as pseudo-labels; "
                "pass targets=labels, or targets='pseudo' to keep this behaviour (targets will be required "
                "in a later version).", FutureWarning, stacklevel=2)
        return head_gradient(model, inputs, targets, *args, **kwargs)

    return wrapper


# name -> a function that builds the value on first use.
_BUILT = {"head_gradient": _head_gradient}


def __getattr__(name: str):
    if name in _BUILT:
        value = globals()[name] = _BUILT[name]()
        return value
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'valfree' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
