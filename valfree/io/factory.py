"""Resolving ``MODULE:FACTORY`` and ``MODULE:FUNCTION`` specs to a callable."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import ValfreeError


def resolve_callable(spec: str, what: str = "factory") -> Callable:
    """Import ``module.path:name`` or ``path/to/file.py:name`` and return the attribute ``name``."""
    if ":" not in spec:
        raise ValfreeError(
            f"{what} {spec!r} must have the form MODULE:NAME or path/to/file.py:NAME, e.g. mypkg.models:resnet18."
        )
    module_part, _, name = spec.rpartition(":")
    try:
        if module_part.endswith(".py") or Path(module_part).is_file():
            path = Path(module_part)
            if not path.is_file():
                raise ValfreeError(f"the {what} file {module_part} does not exist.")
            mod_name = f"valfree_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            sys.path.insert(0, str(path.resolve().parent))
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(module_part)
    except ValfreeError:
        raise
    except ModuleNotFoundError as exc:
        raise ValfreeError(f"cannot import {module_part!r} for the {what} {spec!r}: {exc}.") from None
    except Exception as exc:  # the user's module raised while importing
        raise ValfreeError(f"importing {module_part!r} for the {what} {spec!r} failed: {type(exc).__name__}: {exc}.") from None
    if not hasattr(module, name):
        raise ValfreeError(f"{module_part!r} has no attribute {name!r} (from the {what} {spec!r}).")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValfreeError(f"{spec!r} is not callable; the {what} must be a function or class.")
    return fn


def build_model(spec: str, **kwargs) -> nn.Module:
    """Call the ``MODULE:FACTORY`` spec and check that it returns an ``nn.Module``."""
    factory = resolve_callable(spec, "model factory")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ValfreeError(f"the model factory {spec!r} raised {type(exc).__name__}: {exc}.") from None
    if not isinstance(model, nn.Module):
        raise ValfreeError(f"the model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model
