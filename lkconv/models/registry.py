"""The model registry behind lkconv.models.create_model and list_models."""

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers `builder` under its function name (a decorator); called with no arguments it builds the official
    config. A name already taken by another builder raises, rather than silently replacing that model."""
    name = getattr(builder, "__name__", None)
    if not callable(builder) or not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"builder must be a named function (its name is the model's name); got {builder!r}")
    known = _MODELS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (builder.__module__, builder.__qualname__):
        raise ValueError(f"a model named {name!r} is already registered (by {known.__module__}); give the builder "
                         "another name")
    _MODELS[name] = builder
    return builder


def list_models() -> list[str]:
    """The names create_model accepts, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the registered model `name`; with no kwargs, the official ImageNet configuration (1000 classes).

    kwargs override the builder's defaults, e.g. ``num_classes``, ``in_chans``, ``drop_path_rate``,
    ``use_checkpoint``, ``out_indices``, ``use_sync_bn``, ``deploy``, ``device`` and ``dtype``.
    """
    if name not in _MODELS:
        raise ValueError(f"name must be one of {list_models()}; got {name!r}")
    return _MODELS[name](**kwargs)
