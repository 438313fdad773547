"""`fedsdr export`: a run's adapters as standard PEFT folders (and optionally a merged model).

    OUT/<global adapter>/   the global adapter ("default"; FedSDR: "rectify" = LoRA-R)
    OUT/<local adapter>/    with --client K: that client's local adapters (FedSDR: "smooth" = LoRA-S)
    OUT/merged/             with --merge: base + adapters merged, a plain transformers model

Load with plain PEFT:
    model = PeftModel.from_pretrained(base, "OUT/rectify", adapter_name="rectify")
    model.load_adapter("OUT/smooth", adapter_name="smooth")
    model.base_model.set_adapter(["rectify", "smooth"])   # personalized: W0 + S_k + R
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedsdr.algorithms import get_algorithm
from fedsdr.config import ConfigError
from fedsdr.io import atomic_dir
from fedsdr.runs import RunDir


def _copy_adapter(src: Path, dst: Path) -> None:
    with atomic_dir(dst) as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(src / name, tmp / name)


def model_adapters(run: RunDir, server_round: int | None = None,
                   client: int | None = None) -> tuple[int, dict[str, Path]]:
    """(round, {adapter name: PEFT folder}) of the run's global model at checkpoint `server_round`
    (default: the last), or with `client` that client's personalized model; the global adapter
    first. Raises FileNotFoundError for a missing checkpoint or adapter, ConfigError when `client`
    is given but the algorithm keeps no local adapter."""
    cfg = run.read_config()
    server_round = server_round or run.last_checkpoint()
    if not server_round:
        raise FileNotFoundError(f"{run.root}: no checkpoint yet; the run has no completed round")
    checkpoint = run.checkpoint_dir(server_round)
    if not (checkpoint / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{run.root}: no complete checkpoint for round {server_round}")
    algorithm = get_algorithm(cfg)
    folders = {algorithm.global_adapter: checkpoint}
    if client is not None:
        local = algorithm.local_adapters(cfg)
        if not local:
            raise ConfigError(f"--client: {cfg.federation.algorithm} keeps no local adapter on its "
                              "clients; its personalized model is the global one (drop --client)")
        for spec in local:  # each as the client left it after its last round up to `server_round`
            folder = run.client(client).last_adapter(spec.name, server_round)
            if folder is None:
                raise FileNotFoundError(f"{run.client(client).root}: no {spec.name} adapter saved up "
                                        f"to round {server_round}")
            folders[spec.name] = folder
    return server_round, folders


def export_run(run_dir: Path, out: Path, server_round: int | None = None, client: int | None = None,
               merge: bool = False) -> Path:
    run = RunDir(run_dir)
    cfg = run.read_config()
    _, folders = model_adapters(run, server_round, client)
    out = Path(out)
    for name, src in folders.items():
        _copy_adapter(src, out / name)
    if merge:
        merge_adapters(cfg.model, out, list(folders))
    return out


def merge_adapters(model_cfg, out: Path, names: list[str]) -> None:  # noqa: ANN001
    """Write OUT/merged: the base model with the exported adapters added into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsdr.models.loading import load_tokenizer, resolve_model_source

    source = resolve_model_source(model_cfg)
    base = AutoModelForCausalLM.from_pretrained(source)
    model = PeftModel.from_pretrained(base, str(out / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(out / name), adapter_name=name)
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    merged = model.merge_and_unload()
    with atomic_dir(out / "merged") as tmp:
        merged.save_pretrained(str(tmp))
        load_tokenizer(source).save_pretrained(str(tmp))
