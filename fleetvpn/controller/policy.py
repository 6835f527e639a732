"""The controller's policy: pure functions from measurements (and previous state) to settings,
each decision with the reason ``fleetvpn health`` shows and the tests assert.

This module is the one import for callers; the rules live in
  policy_mtu        tunnel MTU per link direction, interface and route MTU per node
  policy_keepalive  keepalive per site (hysteresis, eviction, slow raise) and per (node, peer)
  policy_overrides  which admin override applies (link > node > site)
  health            link health states
Nothing here reads a clock, a socket or a file: ``now`` is an argument.
"""

from fleetvpn.controller.health import (
    LOSS_DEGRADED_RATIO,
    MTU_SHORTFALL_BYTES,
    REJECT_AFTER_TIME_S,
    SEVERITY,
    STALE_AFTER_S,
    classify_direction,
    classify_link,
)
from fleetvpn.controller.policy_keepalive import (
    EVICTION_FLOOR_S,
    HYSTERESIS_MIN_S,
    HYSTERESIS_RATIO,
    KEEPALIVE_MAX_S,
    KEEPALIVE_MIN_S,
    LIFETIME_WINDOW_S,
    RAISE_CONFIRM_S,
    RAISE_FACTOR,
    RAISE_INTERVAL_S,
    FleetKeepalive,
    NodeNat,
    apply_keepalive_override,
    decide_keepalives,
    decide_site_keepalive,
    detect_mapping_losses,
    peer_keepalives,
)
from fleetvpn.controller.policy_mtu import (
    IPV4_MIN_MTU,
    IPV6_MIN_MTU,
    MAX_PATH_MTU,
    OVERHEAD_BYTES,
    SAFE_DEFAULT_MTU,
    FleetMtu,
    MtuMemo,
    apply_mtu_override,
    decide_mtus,
    direction_mtu,
    floor16,
    latest_link_measurements,
    link_mtu,
    node_mtu_plan,
    overhead_for,
    padded_outer_bytes,
)
from fleetvpn.controller.policy_overrides import OverrideIndex, find_override
from fleetvpn.engines.natlife import keepalive_for

__all__ = [
    "EVICTION_FLOOR_S",
    "HYSTERESIS_MIN_S",
    "HYSTERESIS_RATIO",
    "IPV4_MIN_MTU",
    "IPV6_MIN_MTU",
    "KEEPALIVE_MAX_S",
    "KEEPALIVE_MIN_S",
    "LIFETIME_WINDOW_S",
    "LOSS_DEGRADED_RATIO",
    "MAX_PATH_MTU",
    "MTU_SHORTFALL_BYTES",
    "OVERHEAD_BYTES",
    "RAISE_CONFIRM_S",
    "RAISE_FACTOR",
    "RAISE_INTERVAL_S",
    "REJECT_AFTER_TIME_S",
    "SAFE_DEFAULT_MTU",
    "SEVERITY",
    "STALE_AFTER_S",
    "FleetKeepalive",
    "FleetMtu",
    "MtuMemo",
    "NodeNat",
    "OverrideIndex",
    "apply_keepalive_override",
    "apply_mtu_override",
    "classify_direction",
    "classify_link",
    "decide_keepalives",
    "decide_mtus",
    "decide_site_keepalive",
    "detect_mapping_losses",
    "direction_mtu",
    "find_override",
    "floor16",
    "keepalive_for",
    "latest_link_measurements",
    "link_mtu",
    "node_mtu_plan",
    "overhead_for",
    "padded_outer_bytes",
    "peer_keepalives",
]
