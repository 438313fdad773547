"""Keep library chatter (Flower INFO logs, weight-loading bars, deprecations) off the console."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    import transformers

    logging.getLogger("flwr").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="Classes: .* will NOT be used", category=UserWarning)
