"""Where a model keeps a part (vision tower, decoder layers, lm head): transformers versions and model classes
nest them differently (model.visual or visual), so a part is named by its candidate attribute paths."""

from __future__ import annotations

from typing import Any

VISION_TOWER = ("model.visual", "visual")
DECODER_LAYERS = ("model.language_model.layers", "model.layers", "language_model.layers")
LM_HEAD = ("lm_head",)


def first_attribute(obj: Any, paths: tuple[str, ...]) -> Any | None:
    """The object at the first dotted attribute path that exists on obj (and is not None), else None."""
    for path in paths:
        found = obj
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if found is not None:
            return found
    return None
