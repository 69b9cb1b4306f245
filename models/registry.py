"""One way for every family to build its models from the catalog and register them with timm.

Each registered name is a timm entry point taking `pretrained`, `checkpoint` (a local file or URL
in the official, timm or project layout) and the model's keyword arguments over the catalog's
defaults (harness.catalog).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from timm.models import register_model
from torch import nn

_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm's, not the model's


def create(
    build: Callable[..., nn.Module],
    spec: Mapping[str, Any],
    pretrained: bool,
    checkpoint: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`build(**defaults, **kwargs)` from the catalog spec; then load `checkpoint`, or the spec's
    `_url` (the published weights the official code starts from) if `pretrained`.

    Args:
        build: the family's model class (or a function choosing it), called with keyword arguments.
        spec: the catalog entry: the model's default arguments, plus `_url` / `_family` (not passed).
        pretrained: load the published weights of `_url`; a ValueError where the entry has none and
            no `checkpoint` is given.
        checkpoint: a local file or URL of weights (official, timm or project layout), loaded
            instead of `_url` (with or without `pretrained`).
        **kwargs: the model's arguments, over the spec's defaults; timm's factory keys
            (`pretrained_cfg`, `pretrained_cfg_overlay`, `cache_dir`) are dropped.
    """
    for key in _FACTORY_KEYS:
        kwargs.pop(key, None)
    defaults = {k: v for k, v in spec.items() if not k.startswith("_")}
    model = build(**{**defaults, **kwargs})
    source = checkpoint or (spec.get("_url") if pretrained else None)
    if pretrained and source is None:
        raise ValueError("pretrained: this model has no published weights; pass checkpoint=PATH_OR_URL")
    if source is not None:
        from models.checkpoint import load_weights

        load_weights(model, source)
    return model


def register_family(
    specs: Mapping[str, Mapping[str, Any]],
    family: str,
    build: Callable[..., nn.Module],
    module_name: str,
    title: str,
) -> dict[str, Callable[..., nn.Module]]:
    """Register every catalog name of `family` (its spec's `_family`, "deit" when absent) with timm.

    Returns the entry points by name (a family module may expose them as its attributes).

    Args:
        specs: the catalog (`harness.catalog.MODEL_DEFAULTS` or `SPATIAL_MODELS`): name -> entry.
        family: which entries to register: those whose `_family` is this.
        build: what every entry point builds through `create` (the family's model class).
        module_name: the module the entry points belong to (timm files them under it).
        title: the family's name, the first words of each entry point's docstring.
    """

    def entrypoint_for(name: str, spec: Mapping[str, Any]) -> Callable[..., nn.Module]:
        def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            return create(build, spec, pretrained, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__doc__ = (
            f"{title} `{name}`: {spec}\n\n"
            "Args:\n"
            "    pretrained: load the entry's published weights (`_url`; a ValueError where it has none).\n"
            "    checkpoint: a local file or URL of weights (official, timm or project layout), loaded instead.\n"
            f"    **kwargs: the arguments of `{build.__module__}.{build.__qualname__}` (its Args), over the"
            " entry's defaults.\n"
        )
        entrypoint.__module__ = module_name
        return register_model(entrypoint)

    return {name: entrypoint_for(name, spec) for name, spec in specs.items() if spec.get("_family", "deit") == family}
