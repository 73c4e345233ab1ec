"""Random capture-condition augmentation of training crops (low-res, JPEG, gray/IR, blur, masks).

Each image independently gets each degradation of :mod:`workers.faces.degrade` with its probability and
random parameters, reproducibly from ``(seed, epoch, step, rank)``. Degradations apply in the order a
camera would produce them: the mask is on the face (scene), blur is optics/motion, low resolution is
the sensor's sampling, gray is the sensor/ISP (IR cameras are monochrome), JPEG is storage and transport,
so compression artefacts are never blurred or rescaled away. The horizontal flip stays in the trainer.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from workers.faces import degrade as D

#: Application order; also the order of random draws (each op draws every image's decision and
#: parameters, applied or not, so changing one probability does not reshuffle the others).
ORDER = ("mask", "blur", "lowres", "gray", "jpeg")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-image probability of each degradation, and the ranges its parameters are drawn from.

    Attributes:
        lowres, jpeg, gray, blur, mask: probabilities in [0, 1] (0: never).
        lowres_px: (lo, hi) side of the low-resolution image, drawn uniformly from the integers lo..hi.
        jpeg_quality: (lo, hi) JPEG quality, integers lo..hi within [1, 100].
        blur_sigma: (lo, hi) Gaussian sigma in pixels, uniform.
        mask_colors: RGB fills, one drawn uniformly per masked image ...
        mask_jitter: ... then each channel shifted by an integer in [-jitter, jitter] (clamped to 0..255).
    """

    lowres: float = 0.0
    jpeg: float = 0.0
    gray: float = 0.0
    blur: float = 0.0
    mask: float = 0.0
    lowres_px: tuple[int, int] = (14, 40)
    jpeg_quality: tuple[int, int] = (10, 60)
    blur_sigma: tuple[float, float] = (0.5, 2.5)
    mask_colors: tuple[tuple[int, int, int], ...] = D.MASK_COLORS
    mask_jitter: int = 20

    def __post_init__(self) -> None:
        for name in ORDER:
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise ValueError(f"probability {name} must be in [0, 1], got {p!r}")
        for name, lo_min, hi_max in (("lowres_px", 2, math.inf), ("jpeg_quality", 1, 100),
                                     ("blur_sigma", 1e-6, math.inf)):
            r = getattr(self, name)
            if len(r) != 2 or not lo_min <= r[0] <= r[1] <= hi_max:
                raise ValueError(f"{name} must be (lo, hi) with {lo_min} <= lo <= hi <= {hi_max}, got {r!r}")
        colors = np.asarray(self.mask_colors)
        if colors.ndim != 2 or colors.shape[0] < 1 or colors.shape[1] != 3 or colors.min() < 0 or colors.max() > 255:
            raise ValueError(f"mask_colors must be one or more RGB triples in 0..255, got {self.mask_colors!r}")
        if not 0 <= self.mask_jitter <= 255:
            raise ValueError(f"mask_jitter must be in [0, 255], got {self.mask_jitter}")

    @property
    def enabled(self) -> bool:
        """Whether any degradation has a non-zero probability."""
        return any(getattr(self, name) > 0 for name in ORDER)


def parse_augment(text: str, base: AugmentConfig = AugmentConfig()) -> AugmentConfig:
    """Parse ``"lowres=0.5,jpeg=0.3,gray=0.2,mask=0.3,blur=0.2"`` into probabilities (and ranges).

    Args:
        text: comma-separated ``name=probability``, or ``name=probability@lo-hi`` to set the parameter
            range too (``lowres=0.7@12-32``: side 12..32 px; ``jpeg=0.3@10-40``; ``blur=0.2@0.5-2``); names
            not given keep ``base``'s; ``""`` or ``"none"`` gives ``base`` unchanged.
        base: supplies the parameter ranges and unlisted probabilities.

    Returns:
        The config.

    Raises:
        ValueError: naming a malformed item, an unknown or repeated name, or a probability outside [0, 1].
    """
    if not isinstance(text, str):
        raise ValueError(f"augment spec must be a string, got {text!r}")
    if text.strip().lower() in ("", "none"):
        return base
    probs: dict[str, object] = {}
    for item in text.split(","):
        name, eq, value = (s.strip() for s in item.partition("="))
        value, at, span = (s.strip() for s in value.partition("@"))
        if not eq or not name:
            raise ValueError(f"malformed augment item {item.strip()!r} in {text!r}: expected name=probability")
        if name not in ORDER:
            raise ValueError(f"unknown augmentation {name!r} in {text!r}; known: {', '.join(ORDER)}")
        if name in probs:
            raise ValueError(f"augmentation {name!r} repeated in {text!r}")
        try:
            p = float(value)
        except ValueError:
            raise ValueError(f"probability of {name!r} must be a number, got {value!r}") from None
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability of {name!r} must be in [0, 1], got {value!r}")
        probs[name] = p
        if at:
            probs[RANGES.get(name, name + "_range")] = _parse_range(name, span, text)
    try:
        return dataclasses.replace(base, **probs)
    except TypeError:
        raise ValueError(f"only {', '.join(RANGES)} take a range (name=p@lo-hi), got {text!r}") from None


#: The range field of each augmentation that has one.
RANGES = {"lowres": "lowres_px", "jpeg": "jpeg_quality", "blur": "blur_sigma"}


def _parse_range(name: str, span: str, text: str) -> tuple:
    lo, dash, hi = span.partition("-")
    kind = float if name == "blur" else int
    try:
        if not dash:
            raise ValueError
        return kind(lo), kind(hi)
    except ValueError:
        raise ValueError(f"range of {name!r} must be lo-hi ({kind.__name__}s), got {span!r} in {text!r}") from None


def augment_batch(crops: np.ndarray, config: AugmentConfig, seed: int, epoch: int, step: int,
                  rank: int) -> np.ndarray:
    """Randomly degrade each crop, reproducibly from ``(seed, epoch, step, rank)``.

    Args:
        crops: uint8[N, S, S, 3] RGB aligned crops.
        config: probabilities and parameter ranges.
        seed, epoch, step, rank: non-negative ints seeding ``numpy.random.SeedSequence``.

    Returns:
        uint8[N, S, S, 3], a new array (the input is not modified).

    Raises:
        ValueError: bad crops or a negative seed component.
    """
    crops = D.check_crops(crops)
    keys = (seed, epoch, step, rank)
    if any(int(k) != k or k < 0 for k in keys):
        raise ValueError(f"seed, epoch, step, rank must be non-negative ints, got {keys}")
    rng = np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))
    n, c = len(crops), config
    out = crops.copy()
    for name in ORDER:
        apply = rng.random(n) < getattr(c, name)
        if name == "mask":
            pick = rng.integers(0, len(c.mask_colors), n)
            shift = rng.integers(-c.mask_jitter, c.mask_jitter + 1, (n, 3))
            param = np.clip(np.asarray(c.mask_colors, np.int64)[pick] + shift, 0, 255).astype(np.uint8)
        elif name == "blur":
            param = rng.uniform(*c.blur_sigma, n)
        elif name == "lowres":
            param = rng.integers(c.lowres_px[0], c.lowres_px[1] + 1, n)
        elif name == "jpeg":
            param = rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1, n)
        else:
            param = None
        idx = np.flatnonzero(apply)
        if idx.size == 0:
            continue
        if name == "mask":
            out[idx] = D.mask(out[idx], param[idx])
        elif name == "gray":
            out[idx] = D.gray(out[idx])
        else:
            out[idx] = {"blur": D.blur, "lowres": D.lowres, "jpeg": D.jpeg}[name](out[idx], param[idx])
    return out
