"""Model names -> what ``from_pretrained`` should load: the one place that knows the names.

- a bundled name (``"smollm2-135m-instruct"``, :data:`fedsdr.models.bundled.BUNDLED_MODELS`)
  -> its prepared folder in the cache;
- ``"tiny-random"`` -> the tiny random test model (:mod:`fedsdr.models.tiny`);
- an existing local folder -> itself;
- anything else -> unchanged (a hub id, for transformers to fetch when there is internet),
  except a near miss of a known name without a ``/`` (``"smollm2-135m-instruc"``), which
  is a clear error instead of a confusing hub lookup.

:func:`check_model_name` is the stricter check the CLI runs before any data or model loads
(it downloads and builds nothing): a folder path that does not exist, a near miss of a known
name, and (offline) a hub id that is not in the Hugging Face cache are ConfigErrors naming
``model.name``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from fedsdr.config import ConfigError
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
        close = _close_name(name_or_path, cutoff=0.8)
        if close:
            raise ConfigError(
                f"model.name: unknown model {name_or_path!r}: not a bundled name, not a folder. "
                f"Did you mean {close!r}? Bundled names: {known_names()}"
            )
    return name_or_path


def _close_name(name: str, cutoff: float) -> str | None:
    close = difflib.get_close_matches(name.lower(), known_names(), n=1, cutoff=cutoff)
    return close[0] if close else None


def _looks_like_path(name: str) -> bool:
    # a hub id is "owner/name": one slash, no leading dot, tilde or separator
    return name.startswith((".", "/", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return is_offline_mode() or any(f in ("1", "true", "yes", "on") for f in flags)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError as e:
        raise ConfigError(f"model.name: {repo_id!r} is not a folder and not a valid hub id: {e}") from None


def check_model_name(name: str) -> None:
    """Raise ConfigError (naming `model.name`) when `name` can be neither loaded nor fetched:
    a folder path that does not exist, a near miss of a bundled name, or, offline, a hub id that
    is not in the Hugging Face cache. Builds and downloads nothing."""
    if name in BUNDLED_MODELS or name == TINY_NAME or Path(name).expanduser().is_dir():
        return
    known = f"bundled names: {', '.join(known_names())}"
    if _looks_like_path(name):
        raise ConfigError(f"model.name: folder {name!r} not found (not a folder; {known})")
    if _in_hub_cache(name):
        return
    close = _close_name(name.rsplit("/", 1)[-1], cutoff=0.6)
    if close:
        raise ConfigError(f"model.name: unknown model {name!r}: not a bundled name, not a folder. "
                          f"Did you mean {close!r}? ({known})")
    if _offline():
        raise ConfigError(f"model.name: unknown model {name!r}: not a bundled name, not a local folder, and "
                          f"not in the Hugging Face cache (offline: HF_HUB_OFFLINE); {known}, or give a "
                          "folder holding a transformers model")
