"""`fedsdr eval`: EleutherAI's lm-evaluation-harness on a run's global or personalized model.

The base model is loaded once and the run's adapters are attached in memory with PEFT (nothing
is merged or exported): the global adapter of checkpoint round N, and with `client=K` also that
client's local adapters as it left them after its last round <= N (FedSDR: W0 + LoRA-S_k +
LoRA-R). lm-eval's `HFLM` wraps that model; `simple_evaluate` runs the tasks.

    RUN/lm-eval/round-NNN.json                 the global model's results
    RUN/lm-eval/round-NNN-client-K.json        client K's personalized model
    RUN/lm-eval/round-NNN[-client-K].samples.jsonl   with log_samples: one line per scored item

lm-eval is an optional extra (`pip install -e '.[lm-eval]'`). Its built-in tasks fetch their
data from the Hugging Face hub; offline, point `include_path` at a folder of task YAMLs that
read local files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedsdr.config import ConfigError
from fedsdr.io import write_json_atomic, write_text_atomic
from fedsdr.runs import RunDir, client_name, round_name

INSTALL_HINT = "lm-eval is not installed: pip install -e '.[lm-eval]'"


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    _pytablewriter_compat()


def _pytablewriter_compat() -> None:
    """lm-eval's `make_table` sets `writer.headers`. The pinned python-dateutil 4 rules out every
    pytablewriter >= 0.39 (their typepy[datetime] wants dateutil < 3), so pip settles on 0.38,
    whose writers call that attribute `header_list`; without this alias the table's header row
    reads `A | B | C ...`."""
    try:
        from pytablewriter import LatexTableWriter, MarkdownTableWriter
    except ImportError:
        return
    for writer in (MarkdownTableWriter, LatexTableWriter):
        if "headers" not in dir(writer) and "header_list" in dir(writer):
            writer.headers = property(lambda self: self.header_list,
                                      lambda self, value: setattr(self, "header_list", value))


def load_model(run: RunDir, folders: dict[str, Path]):  # noqa: ANN201
    """(PEFT model with every adapter in `folders` active, tokenizer, runtime, source)."""
    import torch
    from peft import PeftModel

    from fedsdr.models.loading import (
        load_base_model,
        load_tokenizer,
        resolve_model_source,
        resolve_runtime,
    )

    cfg = run.read_config()
    runtime = resolve_runtime(cfg.model)
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, runtime, cfg.model.attn_implementation)
    names = list(folders)
    model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    # PeftModel.set_adapter takes one name; the LoRA model underneath activates several at once.
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    model.to(runtime.device)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer, runtime, source


def _json_safe(value: Any) -> Any:
    """What json.dumps(allow_nan=False) accepts: lm-eval's own converter for numpy scalars, sets
    and objects (task configs may hold functions), then NaN/inf as null."""
    from lm_eval.utils import handle_non_serializable

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(json.dumps(value, default=handle_non_serializable)))


def output_path(run_dir: Path, server_round: int, client: int | None) -> Path:
    stem = round_name(server_round) + (f"-{client_name(client)}" if client is not None else "")
    return Path(run_dir) / "lm-eval" / f"{stem}.json"


def run_lm_eval(run_dir: Path, tasks: list[str], *, server_round: int | None = None,
                client: int | None = None, limit: int | None = None, batch_size: int = 8,
                include_path: str | None = None, num_fewshot: int | None = None,
                log_samples: bool = False, apply_chat_template: bool = False,
                verbose: bool = True) -> dict:
    """Run lm-eval `tasks` on the run's global model (or client `client`'s personalized model)
    of checkpoint `server_round` (default: the last). Prints lm-eval's table, writes the results
    JSON (see the module doc) and returns lm-eval's results dict (with `samples` when
    `log_samples`), plus a `fedsdr` entry naming the run, round, client and adapters."""
    _require_lm_eval()
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: name at least one lm-eval task (comma-separated)")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path: {include_path} is not a folder of task YAMLs")
    from fedsdr.export import model_adapters

    run = RunDir(Path(run_dir))
    server_round, folders = model_adapters(run, server_round, client)  # fails before any loading

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    task_manager = TaskManager(include_path=include_path)
    matched = task_manager.match_tasks(tasks)
    missing = [t for t in tasks if t not in matched and "*" not in t]
    if missing:
        hint = "" if include_path else "; local task YAMLs need --include-path FOLDER"
        raise ConfigError(f"--tasks: lm-eval knows no task {', '.join(map(repr, missing))}{hint}")

    model, tokenizer, runtime, source = load_model(run, folders)
    mixed = runtime.compute_dtype if runtime.compute_dtype != runtime.dtype else None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              mixed_precision_dtype=mixed)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=task_manager,
        log_samples=log_samples, apply_chat_template=apply_chat_template,
    )
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed launch
        raise RuntimeError("lm-eval returned no results")
    results["fedsdr"] = {
        "run": str(run.root), "round": server_round, "client": client, "base_model": source,
        "model": "personalized" if client is not None else "global",
        "adapters": {name: str(folder) for name, folder in folders.items()},
        "batch_size": batch_size, "apply_chat_template": apply_chat_template,
    }

    path = output_path(run.root, server_round, client)
    samples = results.get("samples")
    write_json_atomic(path, _json_safe({k: v for k, v in results.items() if k != "samples"}))
    if samples is not None:
        lines = [json.dumps(_json_safe({"task": task, **sample}), ensure_ascii=False, allow_nan=False)
                 for task, items in samples.items() for sample in items]
        write_text_atomic(path.with_suffix(".samples.jsonl"), "".join(line + "\n" for line in lines))
    if verbose:
        label = f"client {client} personalized" if client is not None else "global"
        print(f"lm-eval on the {label} model of {run.root}, round {server_round} "
              f"(adapters: {', '.join(folders)})")
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        print(f"results in {path}")
    return results
