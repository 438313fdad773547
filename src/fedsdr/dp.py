"""Differential privacy of the global adapter: Flower's clipping DP wrappers, chosen by
`federation.dp`, and the (epsilon, delta) the run's noise buys.

What is clipped: each client's update of the global adapter (its adapter minus the one it
received), to L2 norm C (`federation.dp_clipping_norm`; adaptive: the initial C, which then
tracks the `dp_target_quantile` of the update norms, Andrew et al. 2019; Flower 1.42 moves it
the wrong way, see `_UnclippedFraction`). Where:
  server-*   by the strategy wrapper on the server, inside `aggregate_train`, i.e. after our
             reply validation (`federation.validation`): `max_update_norm` sees the raw update
             and rejects it outright when it is above that bound; below it, DP clips to C.
  client-*   by Flower's `fixedclipping_mod` / `adaptiveclipping_mod` on the ClientApp
             (`client_dp_mod`), before the reply leaves the client: validation sees the clipped
             update (norm <= C, so a `max_update_norm` >= C never rejects it).
Noise: the wrapper adds N(0, (z C / m)^2) to every coordinate of the aggregate (m = clients
sampled per round, z = `dp_noise_multiplier`); the server seeds numpy per round, so a run
replays exactly.

Epsilon: client-level (add/remove one client), by the Renyi DP accountant of Opacus
(`opacus.accountants.analysis.rdp`) for the sampled Gaussian mechanism, with sampling rate
q = m / num_clients and one release per round, converted to (epsilon, delta) at `dp_delta`
(unset: min(1e-5, num_clients^-1.1), below 1/num_clients). Adaptive clipping splits z between
the update and the clipped-count query (Flower's `compute_adaptive_noise_params`); together they
cost what one Gaussian release with z costs, so epsilon uses z either way. The guarantee holds
for what the accountant assumes: a uniform mean of the clipped updates (FedAvg weighs by
examples, equal only with equal client data; robust and FedOpt servers post-process the
mean differently, so their epsilon is nominal), all m sampled replies aggregated (a rejected
reply leaves the noise at z C / m over fewer clients), and sampling treated as Poisson with
rate q (Flower samples m without replacement), as in DP-FedAvg (McMahan et al., 2018).
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedsdr.config import ConfigError, RunConfig, config_from_json

# Algorithms the wrappers cannot serve: more tensors than the global adapter travel (SCAFFOLD's
# control variates), nothing is uploaded (local), or one trainer is no federation (centralized).
UNSUPPORTED = {"scaffold": "it sends control variates besides the adapter",
               "local": "clients upload nothing", "centralized": "one trainer per round has no client-level privacy"}
WRAPPED = "wrapped."  # prefix of the wrapped strategy's state in a checkpoint


class _UnclippedFraction:
    """Andrew et al.'s update C <- C exp(-lr (b - target)) takes b = the fraction of updates left
    unclipped; Flower 1.42's adaptive wrappers pass the fraction clipped, so C shrinks while every
    update is clipped, toward 0 (tests/test_dp.py). Flipping it back changes no privacy: the
    count's Gaussian noise is symmetric, and 1 - noisy clipped fraction is the noisy unclipped one."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)  # type: ignore[misc]


class ServerSideAdaptiveClipping(_UnclippedFraction, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, its norm moving toward the target quantile."""


class ClientSideAdaptiveClipping(_UnclippedFraction, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (with `adaptiveclipping_mod`), likewise."""


def sampled_clients(cfg: RunConfig) -> int:
    """Clients a round samples, as Flower's strategies count them."""
    n, fed = cfg.partition.num_clients, cfg.federation
    return max(int(n * fed.fraction_train), min(n, fed.min_train_clients))


def delta(cfg: RunConfig) -> float:
    """`federation.dp_delta`, else min(1e-5, num_clients^-1.1)."""
    if cfg.federation.dp_delta is not None:
        return cfg.federation.dp_delta
    return min(1e-5, cfg.partition.num_clients ** -1.1)


def check(cfg: RunConfig) -> None:
    """Config errors Flower's wrappers would raise later, named by key."""
    fed = cfg.federation
    if fed.dp == "none":
        return
    if fed.algorithm in UNSUPPORTED:
        raise ConfigError(f"federation.dp = {fed.dp!r}: not available with federation.algorithm = "
                          f"{fed.algorithm!r} ({UNSUPPORTED[fed.algorithm]})")
    if fed.dp.endswith("adaptive") and fed.dp_noise_multiplier > 0:
        stddev = count_stddev(cfg)
        if fed.dp_noise_multiplier >= 2 * stddev:
            raise ConfigError(
                f"federation.dp_noise_multiplier = {fed.dp_noise_multiplier}: adaptive clipping needs it below "
                f"2 x federation.dp_clipped_count_stddev = {2 * stddev:g} (unset: sampled clients / 20); "
                "raise dp_clipped_count_stddev or lower the noise multiplier")


def count_stddev(cfg: RunConfig) -> float:
    """Noise on the adaptive clipped-count query: the config's, else Flower's m / 20."""
    value = cfg.federation.dp_clipped_count_stddev
    return value if value is not None else sampled_clients(cfg) / 20


def wrap(cfg: RunConfig, strategy: Strategy) -> Strategy:
    """`strategy` inside the Flower DP wrapper `federation.dp` names (itself for "none")."""
    fed = cfg.federation
    check(cfg)
    z, c, m = fed.dp_noise_multiplier, fed.dp_clipping_norm, sampled_clients(cfg)
    if fed.dp in ("server-fixed", "client-fixed"):
        fixed = DifferentialPrivacyServerSideFixedClipping if fed.dp == "server-fixed" else \
            DifferentialPrivacyClientSideFixedClipping
        return fixed(strategy, z, c, m)
    if fed.dp in ("server-adaptive", "client-adaptive"):
        adaptive = ServerSideAdaptiveClipping if fed.dp == "server-adaptive" else ClientSideAdaptiveClipping
        return adaptive(strategy, z, m, initial_clipping_norm=c, target_clipped_quantile=fed.dp_target_quantile,
                   clipped_count_stddev=count_stddev(cfg) if z > 0 else fed.dp_clipped_count_stddev)
    return strategy


def wrapped(strategy: Strategy) -> Strategy | None:
    """The strategy a DP wrapper wraps (None: not a wrapper)."""
    inner = vars(strategy).get("strategy")
    return inner if isinstance(inner, Strategy) else None


def wrapper_state(strategy: Strategy) -> dict[str, Any]:
    """A wrapper's own scalars for a checkpoint (the adaptive clipping norm); the arrays it keeps
    for the round in flight are not state."""
    return {k: v for k, v in vars(strategy).items()
            if not k.startswith("_") and (v is None or isinstance(v, bool | int | float | str))}


def epsilon(noise_multiplier: float, sample_rate: float, releases: int, target_delta: float) -> float:
    """Epsilon at `target_delta` after `releases` sampled Gaussian releases (RDP accountant);
    inf without noise, 0 before any release."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        from opacus.accountants.analysis import rdp
        from opacus.accountants.rdp import RDPAccountant
    except ImportError as e:
        raise ConfigError("federation.dp: computing epsilon needs opacus (pip install 'opacus>=1.6,<1.7'; "
                          "scripts/setup.sh installs it)") from e
    orders = RDPAccountant.DEFAULT_ALPHAS
    spent = rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=releases, orders=orders)
    eps, _ = rdp.get_privacy_spent(orders=orders, rdp=spent, delta=target_delta)
    return float(eps)


def round_fields(cfg: RunConfig, strategy: Strategy, server_round: int) -> dict[str, Any]:
    """The DP figures of the server's train row of `server_round`, read before aggregation (the
    clipping norm this round clips to); epsilon counts every round up to this one as a release."""
    fed = cfg.federation
    if fed.dp == "none":
        return {}
    z = fed.dp_noise_multiplier
    eps = epsilon(z, sampled_clients(cfg) / cfg.partition.num_clients, server_round, delta(cfg))
    return {
        "dp": fed.dp,
        "dp_noise_multiplier": z,
        # adaptive: the part of z on the update (the rest noises the clipped count)
        "dp_update_noise_multiplier": float(getattr(strategy, "noise_multiplier", z)),
        "dp_clipping_norm": float(getattr(strategy, "clipping_norm", fed.dp_clipping_norm)),
        "dp_epsilon": eps if math.isfinite(eps) else None,  # None: no noise, no guarantee
        "dp_delta": delta(cfg),
    }


def run_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last round's DP figures, for summary.json."""
    last = [r for r in rows if r.get("scope") == "global" and r.get("kind") == "train" and "dp" in r]
    return {k: v for k, v in last[-1].items() if k.startswith("dp")} if last else {}


def describe(summary: dict[str, Any]) -> str:
    """One line for the run's outcome ("" without DP)."""
    if "dp" not in summary:
        return ""
    eps = summary.get("dp_epsilon")
    return (f"DP {summary['dp']}: noise multiplier {summary['dp_noise_multiplier']:g}, clipping norm "
            f"{summary['dp_clipping_norm']:.4g}, epsilon {'inf' if eps is None else f'{eps:.3g}'} at delta "
            f"{summary['dp_delta']:.3g}")


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """On the ClientApp's train handler: Flower's clipping mod the run's `federation.dp` names
    (client-fixed, client-adaptive), else the handler as it is. The server's wrapper puts the
    clipping norm in the round's config."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type != MessageType.TRAIN or config is None or "fedsdr-config" not in config:
        return call_next(msg, context)
    mode = config_from_json(str(config["fedsdr-config"])).federation.dp
    if mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)
