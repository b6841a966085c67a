"""The preprocessing recipe of a model version (its source of truth: ``preprocess.*`` in config.pbtxt)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidInput

CROPS = ("center", "object", "stretch")
BACKGROUNDS = ("keep", "dark")


@dataclass(frozen=True)
class Spec:
    """The field defaults are the recipe's defaults (their one definition): a ``preprocess.*`` parameter
    missing from config.pbtxt, or a field left unset in a ``PreprocessRequest``, takes them."""

    height: int
    width: int
    channels: int = 3
    crop: str = "center"
    resize_shorter: int = 0
    background: str = "keep"

    @classmethod
    def with_defaults(cls, height: int, width: int, channels: int = 0, crop: str = "", resize_shorter: int = 0,
                      background: str = "") -> Spec:
        """A recipe where each unset field (0 or "", as protobuf leaves it) takes its default."""
        return cls(height=height, width=width, channels=channels or cls.channels, crop=crop or cls.crop,
                   resize_shorter=resize_shorter or cls.resize_shorter, background=background or cls.background)

    @classmethod
    def from_parameters(cls, dims: tuple[int, ...] | list[int], params: dict[str, str]) -> Spec:
        """The recipe of a model from its ``image`` input dims ``[H, W, C]`` and its config parameters."""
        height, width, channels = (int(d) for d in dims)
        return cls.with_defaults(
            height, width, channels,
            crop=params.get("preprocess.crop", ""),
            resize_shorter=int(params.get("preprocess.resize_shorter", "") or 0),
            background=params.get("preprocess.background", ""),
        ).validate()

    def validate(self) -> Spec:
        if not (1 <= self.height <= 4096 and 1 <= self.width <= 4096):
            raise InvalidInput(f"spec size {self.height}x{self.width} is outside 1..4096", reason="bad_spec")
        if self.channels not in (1, 3):
            raise InvalidInput(f"spec channels={self.channels}; use 1 or 3", reason="bad_spec")
        if self.crop not in CROPS:
            raise InvalidInput(f"spec crop={self.crop!r}; use one of {', '.join(CROPS)}", reason="bad_spec")
        if self.background not in BACKGROUNDS:
            raise InvalidInput(f"spec background={self.background!r}; use one of {', '.join(BACKGROUNDS)}",
                               reason="bad_spec")
        return self
