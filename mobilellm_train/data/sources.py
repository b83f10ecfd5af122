"""`data.sources` as text -> the folders and weights it names. Light (no torch, no numpy), so
the config check can parse it before anything heavy is imported."""

import math

from mobilellm_train.errors import DataError


def parse_sources(text: str) -> list[tuple[str, float]]:
    """'path' or 'path1:0.7,path2:0.3' -> [(path, weight), ...]; a bare path weighs 1."""
    sources = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        path, sep, weight = part.rpartition(":")
        if sep:
            try:
                value = float(weight)
            except ValueError:
                path, value = part, 1.0  # a colon inside the path, no weight
        else:
            path, value = part, 1.0
        if not (value > 0 and math.isfinite(value)):
            raise DataError(f"data sources {text!r}: weight of {path!r} must be a positive number, got {weight!r}")
        sources.append((path, value))
    if not sources:
        raise DataError(f"data sources {text!r}: no folder given")
    return sources
