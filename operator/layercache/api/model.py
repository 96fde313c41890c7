"""The base of the API models: camelCase on the wire, snake_case in Python, checked types.

Unknown fields are ignored on read and never written. That is what the CRDs' structural
schemas imply: the apiserver prunes every field a schema does not declare (none of the
objects' ``spec`` or ``status`` preserves unknown fields), so an unknown field can only be
one a newer operator or agent knows; an older reader during a rolling upgrade must go on.
Types are strict (an ``int`` is not a bool or a string): the apiserver has checked them
already, so a mismatch means a wrong writer and is reported, naming the field.

``to_dict`` writes exactly the fields that were set (given to the constructor or present
in the dict read), so ``from_dict(d).to_dict() == d`` for every valid ``d``, and the
objects written are the same dicts, key for key, as before the models existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

__all__ = ["Condition", "InvalidObjectError", "WireModel", "field_path"]


class InvalidObjectError(ValueError):
    """A field of a LayerCache or NodeLayerCache cannot be used.

    The message names the object and the field: ``"NodeLayerCache n1: spec.layers[3].size:
    Input should be a valid integer"``. ``kind``, ``name`` and ``path`` (the field, from the
    object's root) are kept as attributes.
    """

    def __init__(self, kind: str, name: str, path: str, problem: str) -> None:
        super().__init__(f"{kind} {name}: {path}: {problem}")
        self.kind, self.name, self.path, self.problem = kind, name, path, problem


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("layers", 3, "size")`` → ``"layers[3].size"`` (pydantic's error location)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class WireModel(BaseModel):
    """A model of one CRD object part; see the module docstring for the rules."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, strict=True,
                              extra="ignore", frozen=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, kind: str = "", name: str = "",
                  root: str = "") -> Self:
        """The model of ``raw`` (the CRD's camelCase dict; None reads as empty).

        Raises:
            InvalidObjectError: a field has the wrong type or value; names ``kind``,
                ``name`` and the field below ``root`` (e.g. ``"spec"``).
        """
        try:
            return cls.model_validate(dict(raw or {}))
        except ValidationError as error:
            first = error.errors()[0]
            path = field_path((root, *first["loc"]) if root else tuple(first["loc"]))
            raise InvalidObjectError(kind or cls.__name__, name or "?", path or root,
                                     first["msg"]) from None

    def to_dict(self) -> dict[str, Any]:
        """The CRD's camelCase dict of the fields set (see the module docstring)."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")


class Condition(WireModel):
    """One status condition (sig-architecture API conventions).

    Built by `layercache.api.conditions.condition`: ``status`` is ``"True"``, ``"False"`` or
    ``"Unknown"``, ``reason`` a `layercache.api.reasons.Reason`.
    """

    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None
