# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Dynamic inventory from the fleetvpn controller: nodes, sites, health, recommendations."""

from __future__ import annotations

DOCUMENTATION = r"""
---
name: controller
short_description: The fleet as the fleetvpn controller sees it
version_added: 0.1.0
author: fleetvpn developers
description:
  - One host per node enrolled at the controller (C(GET /v1/nodes)).
  - Groups per site (C(site_<site>)) and per health state (C(health_<state>), the worst state of
    the node's links -- blackhole, down, stale, degraded, unmeasured, ok -- from C(GET /v1/health),
    read page by page, O(health_page_size) links a request, so no single answer is huge).
  - Host variables -- C(fleetvpn_site), C(fleetvpn_endpoint), C(fleetvpn_listen_port),
    C(fleetvpn_public_key), C(fleetvpn_health_state), C(fleetvpn_health_problems); the recommended
    settings C(fleetvpn_recommended_interface_mtu) (with O(fetch_desired)),
    C(fleetvpn_recommended_keepalive_s) (the site's), and per peer in C(fleetvpn_links) the
    recommended route MTU and keepalive with their reasons and the latest measurements (path MTU,
    RTT, loss, handshake age); C(fleetvpn_nat_mapping_lifetime_s) (the site's smallest recent one).
  - The file must be named C(*.fleetvpn.yml) or C(*.fleetvpn.yaml) (or C(fleetvpn.yml)).
  - Needs an admin token. Supports constructed groups and variables, and caching.
  - Every value that becomes a host, a group or a host variable is parsed by fleetvpn.grammar
    first (names, sites, endpoints, keys, ports, addresses, MTUs, reasons as one printable line).
    A node with a value that does not fit is left out with a warning naming the field; the other
    nodes are not affected.
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: This plugin's name.
    required: true
    choices: [fleetvpn.fleet.controller]
  url:
    description: The controller's base URL.
    type: str
    default: http://127.0.0.1:8080
    env:
      - name: FLEETVPN_CONTROLLER
  token_file:
    description: A file holding an admin token.
    type: path
    env:
      - name: FLEETVPN_TOKEN_FILE
  token:
    description: An admin token (prefer O(token_file)).
    type: str
    env:
      - name: FLEETVPN_TOKEN
  ca_file:
    description: CA certificate of the controller's HTTPS certificate.
    type: path
    env:
      - name: FLEETVPN_CA_FILE
  timeout_s:
    description: Seconds per HTTP request.
    type: float
    default: 10
  fetch_desired:
    description:
      - Also ask for every node's desired tunnel (one request per node) for the recommended
        interface MTU. Turn off for very large fleets.
    type: bool
    default: true
  health_page_size:
    description:
      - Links per C(GET /v1/health) request; the plugin follows C(next_after) until the last
        page.
    type: int
    default: 1000
  site_group_prefix:
    description: Prefix of the per-site groups.
    type: str
    default: site_
  health_group_prefix:
    description: Prefix of the per-health-state groups.
    type: str
    default: health_
"""

EXAMPLES = r"""
# inventories/prod/fleet.fleetvpn.yml
plugin: fleetvpn.fleet.controller
url: https://controller.example.net:8443
token_file: ~/.config/fleetvpn/admin.token
# Reach nodes at the address they enrolled with (the endpoint's IP), where they have one.
compose:
  ansible_host: >-
    fleetvpn_endpoint.rsplit(':', 1)[0].strip('[]') if fleetvpn_endpoint else inventory_hostname
keyed_groups:
  - key: fleetvpn_recommended_keepalive_s | string
    prefix: keepalive
"""

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.display import Display

try:
    from fleetvpn import grammar
    from fleetvpn.model import HEALTH_SEVERITY
except ImportError as e:  # the collection ships inside the fleetvpn wheel
    raise ImportError(
        f"fleetvpn.fleet.controller inventory needs the fleetvpn package: {e}"
    ) from None

display = Display()

# Worst first (the controller's order): a node's state is the worst of its links' states.
STATES = HEALTH_SEVERITY


def fetch_health(get, page_size):
    """The health document with every link, read ``page_size`` links a request (``get``: a path
    -> the decoded answer): ``?limit=N&after=<next_after>`` until ``next_after`` is null. A
    controller that does not page answers the whole document at once, without ``next_after``."""
    if page_size < 1:
        raise AnsibleParserError(f"fleetvpn inventory: health_page_size {page_size} is not >= 1")
    links = []
    after = None
    while True:
        query = {"limit": page_size}
        if after is not None:
            query["after"] = after
        page = get("/v1/health?" + urllib.parse.urlencode(query))
        links.extend(page.get("links", []))
        next_after = page.get("next_after")
        if next_after is None:
            return {**page, "links": links, "next_after": None}
        if next_after == after:
            raise AnsibleParserError(
                f"fleetvpn inventory: GET /v1/health after={after} answered the same cursor again"
            )
        after = next_after


def node_states(links):
    """Node name -> the worst state among its links (nodes without links are absent)."""
    worst = {}
    for link in links:
        rank = STATES.index(link["state"]) if link["state"] in STATES else 0
        for node in (link["a"], link["b"]):
            if node not in worst or rank < worst[node]:
                worst[node] = rank
    return {node: STATES[rank] for node, rank in worst.items()}


def node_links(links):
    """Node name -> {peer: what the controller measured and recommends for node→peer}."""
    out = {}
    for link in links:
        for direction in (link["a_to_b"], link["b_to_a"]):
            out.setdefault(direction["node"], {})[direction["peer"]] = {
                "state": direction["state"],
                "reason": direction["reason"],
                "path_mtu": direction["path_mtu"],
                "icmp_seen": direction["icmp_seen"],
                "rtt_s": direction["rtt_s"],
                "loss_ratio": direction["loss_ratio"],
                "handshake_age_s": direction["handshake_age_s"],
                "configured_mtu": direction["configured_mtu"],
                "recommended_mtu": direction["recommended_mtu"],
                "mtu_reason": direction["mtu_reason"],
                "configured_keepalive_s": direction["configured_keepalive_s"],
                "recommended_keepalive_s": direction["recommended_keepalive_s"],
                "keepalive_reason": direction["keepalive_reason"],
            }
    return out


def _mtu(value, field):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 576 <= value <= 9000):  # fmt: skip
        raise grammar.GrammarError(f"{field}: {grammar.shown(value)} is not an MTU (576..9000)")


def check_node(node, links, problems, desired):
    """Raise grammar.GrammarError naming the first value of ``node`` (and what the inventory
    would make of it) that does not fit fleetvpn.grammar."""
    name = grammar.name(node.get("name"), "name")
    grammar.name(node.get("site"), f"{name}: site")
    if node.get("endpoint"):
        grammar.canonical_endpoint(node["endpoint"], f"{name}: endpoint")
    if node.get("listen_port") is not None:
        grammar.port(node["listen_port"], f"{name}: listen_port")
    if node.get("public_key") is not None:
        grammar.wg_key(node["public_key"], f"{name}: public_key")
    for peer, link in (links.get(name) or {}).items():
        grammar.name(peer, f"{name}: links: peer")
        for key in ("state", "reason", "mtu_reason", "keepalive_reason"):
            grammar.note(link.get(key) or "", f"{name}: links: {peer}: {key}")
        for key in ("path_mtu", "configured_mtu", "recommended_mtu"):
            _mtu(link.get(key), f"{name}: links: {peer}: {key}")
    for i, problem in enumerate(problems.get(name, [])):
        grammar.note(problem, f"{name}: health problems[{i}]")
    if desired is not None:
        _mtu(desired.get("interface_mtu"), f"{name}: desired interface_mtu")
        grammar.note(desired.get("interface_mtu_reason", ""), f"{name}: desired mtu reason")
        for i, address in enumerate(desired.get("addresses") or []):
            grammar.interface(address, f"{name}: desired addresses[{i}]")


def host_vars(node, sites, states, links, problems, desired):
    site = sites.get(node["site"], {})
    hv = {
        "fleetvpn_node": node["name"],
        "fleetvpn_site": node["site"],
        "fleetvpn_endpoint": node.get("endpoint") or "",
        "fleetvpn_listen_port": node.get("listen_port"),
        "fleetvpn_public_key": node.get("public_key"),
        "fleetvpn_last_report_at": node.get("last_report_at"),
        "fleetvpn_health_state": states.get(node["name"], "unmeasured"),
        "fleetvpn_health_problems": problems.get(node["name"], []),
        "fleetvpn_links": links.get(node["name"], {}),
        "fleetvpn_recommended_keepalive_s": site.get("keepalive_s"),
        "fleetvpn_recommended_keepalive_reason": site.get("reason"),
        "fleetvpn_nat_mapping_lifetime_s": site.get("mapping_lifetime_s"),
    }
    if desired is not None:
        hv["fleetvpn_recommended_interface_mtu"] = desired["interface_mtu"]
        hv["fleetvpn_recommended_interface_mtu_reason"] = desired["interface_mtu_reason"]
        hv["fleetvpn_addresses"] = desired["addresses"]
    return hv


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "fleetvpn.fleet.controller"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(
            ("fleetvpn.yml", "fleetvpn.yaml", ".fleetvpn.yml", ".fleetvpn.yaml")
        )

    def _get(self, path):
        url = self.get_option("url").rstrip("/") + path
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {self._token}"})
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context(cafile=self.get_option("ca_file"))
        try:
            with urllib.request.urlopen(
                request, timeout=self.get_option("timeout_s"), context=context
            ) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            try:
                detail = json.load(e).get("error", e.reason)
            except ValueError:
                detail = e.reason
            message = f"fleetvpn controller {url}: HTTP {e.code}: {detail}"
            raise AnsibleParserError(message) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise AnsibleParserError(f"fleetvpn controller {url}: unreachable: {reason}") from None

    def _token_from_options(self):
        token_file = self.get_option("token_file")
        if token_file:
            try:
                with open(token_file) as f:
                    return f.read().strip()
            except OSError as e:
                raise AnsibleParserError(
                    f"fleetvpn inventory: token_file {token_file}: {e.strerror}"
                ) from None
        token = self.get_option("token")
        if not token:
            raise AnsibleParserError(
                "fleetvpn inventory: no admin token (token_file, token, or FLEETVPN_TOKEN_FILE)"
            )
        return token

    def _fetch(self):
        nodes = self._get("/v1/nodes")["nodes"]
        health = fetch_health(self._get, self.get_option("health_page_size"))
        desired = {}
        if self.get_option("fetch_desired"):
            for node in nodes:
                if node.get("revoked_at"):
                    continue
                name = urllib.parse.quote(node["name"], safe="")
                desired[node["name"]] = self._get(f"/v1/nodes/{name}/desired")
        return {"nodes": nodes, "health": health, "desired": desired}

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        self._token = self._token_from_options()
        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        data = None
        if use_cache:
            try:
                data = self._cache[cache_key]
            except KeyError:
                data = None
        if data is None:
            data = self._fetch()
            if self.get_option("cache"):
                self._cache[cache_key] = data
        self._populate(data)

    def _populate(self, data):
        health = data["health"]
        links = health.get("links", [])
        states = node_states(links)
        per_node = node_links(links)
        sites = {s["site"]: s for s in health.get("sites", [])}
        problems = {}
        for link in links:
            if link["state"] != "ok":
                for node in (link["a"], link["b"]):
                    problems.setdefault(node, []).append(
                        f"{link['a']} ↔ {link['b']}: {link['state']} ({link['reason']})"
                    )
        site_prefix = self.get_option("site_group_prefix")
        health_prefix = self.get_option("health_group_prefix")
        strict = self.get_option("strict")
        for node in data["nodes"]:
            if node.get("revoked_at"):
                continue
            try:
                check_node(node, per_node, problems, data["desired"].get(node.get("name")))
            except (grammar.GrammarError, KeyError, TypeError, AttributeError) as e:
                display.warning(f"fleetvpn inventory: node left out: {e}")
                continue
            name = node["name"]
            self.inventory.add_host(name)
            hv = host_vars(node, sites, states, per_node, problems, data["desired"].get(name))
            for key, value in hv.items():
                self.inventory.set_variable(name, key, value)
            for group in (
                site_prefix + node["site"],
                health_prefix + hv["fleetvpn_health_state"],
            ):
                self.inventory.add_group(group)
                self.inventory.add_child(group, name)
            self._set_composite_vars(self.get_option("compose"), hv, name, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hv, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hv, name, strict=strict)
