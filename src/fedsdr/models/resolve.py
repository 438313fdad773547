"""Model names -> what ``from_pretrained`` should load: the one place that knows the names.

- a bundled name (``"smollm2-135m-instruct"``, :data:`fedsdr.models.bundled.BUNDLED_MODELS`)
  -> its prepared folder in the cache;
- ``"tiny-random"`` -> the tiny random test model (:mod:`fedsdr.models.tiny`);
- an existing local folder -> itself;
- anything else -> unchanged (a hub id, for transformers to fetch when there is internet),
  except a near miss of a known name without a ``/`` (``"smollm2-135m-instruc"``), which
  is a clear error instead of a confusing hub lookup.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from fedsdr.models.bundled import BUNDLED_MODELS, prepare_bundled
from fedsdr.models.tiny import TINY_NAME, build_tiny_model_dir


def known_names() -> list[str]:
    return sorted([*BUNDLED_MODELS, TINY_NAME])


def resolve_model_path(
    name_or_path: str, cache_dir: Path | None = None, progress: bool = True
) -> str:
    """Map a model reference to what ``from_pretrained`` should load (see the module doc)."""
    if name_or_path in BUNDLED_MODELS:
        return str(prepare_bundled(name_or_path, cache_dir=cache_dir, progress=progress))
    if name_or_path == TINY_NAME:
        return str(build_tiny_model_dir(cache_dir=cache_dir))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if "/" not in name_or_path:
        close = difflib.get_close_matches(name_or_path.lower(), known_names(), n=1, cutoff=0.8)
        if close:
            raise ValueError(
                f"Unknown model {name_or_path!r}: not a bundled name, not a folder. "
                f"Did you mean {close[0]!r}? Bundled names: {known_names()}"
            )
    return name_or_path
