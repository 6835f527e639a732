"""The keepalive rule: a WireGuard PersistentKeepalive from a measured mapping lifetime.

Pure: no I/O, no clock.  The NAT lifetime engine puts its value in each result; the controller
applies the same rule to a site's smallest measured lifetime.
"""

from __future__ import annotations

import math

DEFAULT_KEEPALIVE_S = 25
_KEEPALIVE_DEFAULT_RANGE = (5, 120)
_KEEPALIVE_MAX_S = 65535  # wg(8): persistent-keepalive is 1..65535


def keepalive_for(
    lifetime_s: float | None,
    nat: bool,
    stateful_filter: bool,
    *,
    default_s: int = DEFAULT_KEEPALIVE_S,
    lower_bound_s: float | None = None,
) -> tuple[int, str]:
    """Keepalive interval (s, 0 = off) and its reason, from a measured mapping lifetime.

    K = floor((T - d) / 2) with d = max(2 s, T / 10): one lost keepalive is survived
    (reference.md, "Keepalive rule").  ``lifetime_s`` None means nothing expired up to
    ``lower_bound_s`` (or unknown): ``default_s`` clamped to [5, 120], lowered to the rule's
    value at ``lower_bound_s`` if that is smaller.
    """
    if not nat and not stateful_filter:
        return 0, "no NAT and no stateful filter: nothing expires, keepalive off"
    what = "NAT" if nat else "stateful filter"
    if lifetime_s is None:
        keepalive = min(max(default_s, _KEEPALIVE_DEFAULT_RANGE[0]), _KEEPALIVE_DEFAULT_RANGE[1])
        if lower_bound_s is None:
            return keepalive, f"{what} present, lifetime unknown: default keepalive {keepalive} s"
        bound = keepalive_for(lower_bound_s, nat, stateful_filter)[0]
        how = f"the rule at {lower_bound_s:g} s" if bound < keepalive else "the default"
        return min(bound, keepalive), (
            f"{what} present, no mapping expired within {lower_bound_s:g} s: keepalive "
            f"{min(bound, keepalive)} s, {how}"
        )
    margin = max(2.0, lifetime_s / 10)
    keepalive = math.floor((lifetime_s - margin) / 2)
    if keepalive < 1:
        return 1, f"{what} mapping lifetime {lifetime_s:g} s is below the rule's range: 1 s"
    keepalive = min(keepalive, _KEEPALIVE_MAX_S)
    return keepalive, (
        f"keepalive {keepalive} s = floor(({lifetime_s:g} - {margin:g}) / 2): {what} mapping "
        f"lifetime {lifetime_s:g} s, margin max(2 s, T/10), survives one lost keepalive"
    )
