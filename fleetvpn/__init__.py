"""fleetvpn: keeps WireGuard fleets working on real networks."""

__version__ = "0.1.0"
