"""WgTunnel for real, in a lab of its own (a public hub, a shop behind a NAT on a 1400-byte
black-holed uplink): reconcile brings a tunnel up that handshakes and pings; MTU, keepalive,
route MTU and peers then change live (same ifindex, same wireguard-go process, ping throughout);
a step that fails half-way is rolled back; a link of the wrong type is replaced."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetvpn.lab import netns
from fleetvpn.lab.build import LabPaths
from fleetvpn.runner import NsPath, Runner, netns_path
from fleetvpn.wg import (
    ApplyError,
    PeerSpec,
    TunnelSpec,
    TunnelState,
    WgTunnel,
    generate_private_key,
    public_key_of,
)

from .conftest import LabHandle, lab_name
from .wgutil import sh

LAB = lab_name("fvwgt")
TOPOLOGY = f"""
name: {LAB}
controller: hub
management: 10.253.91.0/24
sites:
  hq:
    kind: public
    hosts: [hub]
  shop:
    kind: nat
    uplink_mtu: 1400
    icmp_blackhole: true
    hosts: [shop1]
"""
KEY_FILE = Path("/etc/wireguard/wg.key")  # as each lab host sees it
HUB_IP, SHOP_IP = "10.99.0.1", "10.99.0.2"
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14  # linux in.h (shared/reference.md)


@dataclass
class End:
    name: str
    ns: NsPath
    netns: str
    tunnel: WgTunnel
    public_key: str
    spec: TunnelSpec = dataclasses.field(init=False)


@dataclass
class Fleet:
    hub: End
    shop: End
    initial: Mapping[str, Sequence[str]]  # host -> kinds of the changes of the first reconcile
    echoed: list[str]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    topo = tmp_path_factory.mktemp("fvwg") / "topology.yml"
    topo.write_text(TOPOLOGY)
    lab = LabHandle(topo, LAB)
    lab.cli("down", check=False)
    lab.cli("up")
    try:
        echoed: list[str] = []
        runner = Runner(echo=echoed.append)
        ends = {}
        for host in ("hub", "shop1"):
            key_file = LabPaths(LAB).host_dir(host) / "etc/wireguard/wg.key"
            generate_private_key(key_file)
            ns = lab.lab.host_ns(host)
            tunnel = WgTunnel("wg0", KEY_FILE, runner, ns=ns)
            # The key as the host sees it, read inside its namespace: same as from outside.
            public = public_key_of(KEY_FILE, runner, ns)
            assert public == public_key_of(key_file)
            ends[host] = End(host, ns, lab.plan.hosts[host].ns, tunnel, public)
        hub, shop = ends["hub"], ends["shop1"]
        hub_public_ip = lab.plan.hosts["hub"].public_ipv4
        hub.spec = TunnelSpec("wg0", 51820, (f"{HUB_IP}/24",), 1420, (
            PeerSpec(shop.public_key, None, (f"{SHOP_IP}/32",), 0, 1328, "shop1"),
        ))  # fmt: skip
        shop.spec = TunnelSpec("wg0", 51820, (f"{SHOP_IP}/24",), 1420, (
            PeerSpec(hub.public_key, f"{hub_public_ip}:51820", (f"{HUB_IP}/32",), 25, 1328, "hub"),
        ))  # fmt: skip
        initial = {e.name: [c.kind for c in e.tunnel.reconcile(e.spec)] for e in (hub, shop)}
        yield Fleet(hub, shop, initial, echoed)
    finally:
        lab.cli("down", check=False)


def wireguard_go_pids(netns: str) -> list[int]:
    """Live wireguard-go processes in that network namespace."""
    inode = os.stat(netns_path(netns)).st_ino
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "wireguard-go":
                continue
            if os.stat(proc / "ns/net").st_ino != inode:
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        pids.append(int(proc.name))
    return pids


@dataclass
class Pinged:
    replies: int
    local_mtu: int | None  # the kernel refused to send: "message too long", with this path MTU


def ping(end: End, dst: str, size_bytes: int = 84, count: int = 3) -> Pinged:
    """ICMP echo with DF set, ``size_bytes`` IP packets, from inside ``end``'s namespace (raw
    socket: the lab hosts have no ping binary)."""
    with netns.entered(end.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        sock.connect((dst, 0))
        ident = random.randrange(1 << 16)
        replies = 0
        for seq in range(count):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"\x5a" * (size_bytes - 28)
            packet = body[:2] + struct.pack("!H", icmp_checksum(body)) + body[4:]
            try:
                sock.send(packet)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                return Pinged(replies, sock.getsockopt(socket.IPPROTO_IP, IP_MTU))
            deadline = time.monotonic() + 1.0
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    break
                icmp = data[(data[0] & 0x0F) * 4 :]
                if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    replies += 1
                    break
        return Pinged(replies, None)


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def assert_pings(end: End, dst: str, size_bytes: int = 84) -> None:
    result = ping(end, dst, size_bytes)
    assert result.replies > 0, f"{end.name} -> {dst}, {size_bytes} bytes: {result}"


def read(end: End) -> TunnelState:
    state = end.tunnel.read()
    assert state is not None
    return state


def config_of(state: TunnelState) -> object:
    """What an apply can change (not counters or handshake times)."""
    peers = sorted((p.public_key, p.endpoint, tuple(sorted(p.allowed_ips)), p.keepalive_s)
                   for p in state.peers)  # fmt: skip
    return (state.ifindex, state.public_key, state.listen_port, state.mtu,
            sorted(state.addresses), peers, dict(state.route_mtus), state.is_up)  # fmt: skip


def test_reconcile_brings_up_a_tunnel_that_handshakes_and_pings(fleet: Fleet) -> None:
    for end in (fleet.hub, fleet.shop):
        assert fleet.initial[end.name][:2] == ["create", "private_key"]
        state = read(end)
        assert state.public_key == end.public_key
        assert (state.mtu, state.listen_port, state.is_up) == (1420, 51820, True)
        assert state.route_mtus == {f"{end.spec.peers[0].allowed_ips[0]}": 1328}
        if state.implementation == "userspace":
            assert len(wireguard_go_pids(end.netns)) == 1
    # The shop is behind the NAT: it dials the hub; then both directions work.
    assert_pings(fleet.shop, HUB_IP)
    for end in (fleet.hub, fleet.shop):  # the handshake, as each end's own dump shows it
        peer = read(end).peers[0]
        assert peer.latest_handshake > 0 and peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert read(fleet.hub).peers[0].endpoint is not None  # learned from the shop's packets
    assert_pings(fleet.hub, SHOP_IP)
    # Full-size packets under the route MTU cross the 1400-byte black hole (1328 + 60 <= 1400)…
    assert_pings(fleet.shop, HUB_IP, size_bytes=1328)
    assert_pings(fleet.hub, SHOP_IP, size_bytes=1328)
    # …and one byte more is stopped locally by the route's locked MTU, never sent into it.
    assert ping(fleet.shop, HUB_IP, size_bytes=1329) == Pinged(0, 1328)
    # Nothing differs now: nothing to do. No command line ever carried a private key.
    assert fleet.hub.tunnel.reconcile(fleet.hub.spec) == []
    assert fleet.shop.tunnel.reconcile(fleet.shop.spec) == []
    for host in ("hub", "shop1"):
        key = (LabPaths(LAB).host_dir(host) / "etc/wireguard/wg.key").read_text().strip()
        assert not any(key in line for line in fleet.echoed)


def test_live_changes_never_recreate_the_interface(fleet: Fleet) -> None:
    hub, shop = fleet.hub, fleet.shop
    ifindex = {e.name: read(e).ifindex for e in (hub, shop)}
    pids = {e.name: wireguard_go_pids(e.netns) for e in (hub, shop)}

    def step(end: End, spec: TunnelSpec, kinds: list[str], reasons: dict[str, str]) -> None:
        changes = end.tunnel.reconcile(spec, reasons)
        assert [c.kind for c in changes] == kinds
        for change in changes:  # each reason is the caller's, when it gave one
            assert change.reason in reasons.values(), change
        end.spec = spec
        assert end.tunnel.reconcile(spec) == []
        for e in (hub, shop):
            assert read(e).ifindex == ifindex[e.name]
            assert wireguard_go_pids(e.netns) == pids[e.name]
        assert_pings(shop, HUB_IP)
        assert_pings(hub, SHOP_IP)

    # Interface MTU (a dry run first: it says so and changes nothing).
    smaller = dataclasses.replace(shop.spec, mtu=1400)
    dry = shop.tunnel.reconcile(smaller, dry_run=True)
    assert [c.summary for c in dry] == ["wg0: mtu 1420 => 1400"]
    assert read(shop).mtu == 1420
    why = {"interface_mtu": "largest link: 1400"}
    step(shop, smaller, ["interface_mtu"], why)
    step(hub, dataclasses.replace(hub.spec, mtu=1400), ["interface_mtu"], why)
    assert read(shop).mtu == read(hub).mtu == 1400

    # Keepalive.
    hub_peer = shop.spec.peers[0]
    why = {f"{hub.public_key}:keepalive": "NAT mapping lifetime 22 s: keepalive 10 s"}
    spec = dataclasses.replace(shop.spec, peers=(dataclasses.replace(hub_peer, keepalive_s=10),))
    step(shop, spec, ["keepalive"], why)
    assert read(shop).peers[0].keepalive_s == 10

    # Route MTU: the locked route MTU is what the kernel now uses.
    hub_peer = shop.spec.peers[0]
    why = {f"{hub.public_key}:route_mtu": "PMTU 1340 measured: 1280"}
    spec = dataclasses.replace(shop.spec, peers=(dataclasses.replace(hub_peer, route_mtu=1280),))
    step(shop, spec, ["route"], why)
    assert read(shop).route_mtus == {f"{HUB_IP}/32": 1280}
    assert_pings(shop, HUB_IP, size_bytes=1280)
    assert ping(shop, HUB_IP, size_bytes=1281) == Pinged(0, 1280)

    # A peer added, then removed, with its route.
    other = public_key_of_new_key(shop)
    extra = PeerSpec(other, "198.18.0.77:51820", ("10.99.0.9/32",), 0, 1300, "extra")
    why = {f"{other}:add": "enrolled", f"{other}:route_mtu": "unmeasured: 1300"}
    step(hub, dataclasses.replace(hub.spec, peers=(*hub.spec.peers, extra)),
         ["peer_add", "route"], why)  # fmt: skip
    state = read(hub)
    assert state.peer(other) is not None and state.route_mtus["10.99.0.9/32"] == 1300
    why = {f"{other}:remove": "retired"}
    step(hub, dataclasses.replace(hub.spec, peers=hub.spec.peers[:1]),
         ["peer_remove", "route_del"], why)  # fmt: skip
    state = read(hub)
    assert state.peer(other) is None and "10.99.0.9/32" not in state.route_mtus


def public_key_of_new_key(end: End) -> str:
    return sh(end.ns, "wg genkey | wg pubkey")


def test_a_step_failing_half_way_is_rolled_back(fleet: Fleet) -> None:
    hub = fleet.hub
    before = read(hub)
    pids = wireguard_go_pids(hub.netns)
    other = public_key_of_new_key(hub)
    shop_peer = hub.spec.peers[0]
    desired = dataclasses.replace(
        hub.spec,
        mtu=1360,
        peers=(
            dataclasses.replace(shop_peer, keepalive_s=7),
            PeerSpec(other, None, ("10.99.0.9/32", "fd00:99::9/128"), 0, 1300, "extra"),
        ),
    )
    # A real failure: with IPv6 off on wg0 the kernel refuses the new peer's IPv6 route, after
    # the MTU, the peer, the keepalive and the peer's IPv4 route were applied.
    sh(hub.ns, "sysctl -qw net.ipv6.conf.wg0.disable_ipv6=1")
    try:
        with pytest.raises(ApplyError) as err:
            hub.tunnel.reconcile(desired)
    finally:
        sh(hub.ns, "sysctl -qw net.ipv6.conf.wg0.disable_ipv6=0")
    e = err.value
    assert e.step.kind == "route" and e.rolled_back, str(e)
    assert [c.kind for c in e.applied] == ["interface_mtu", "keepalive", "peer_add"]
    message = str(e)
    assert message.startswith("wg0: step 4 of 4 failed: peer extra: route 10.99.0.9/32")
    assert "fd00:99::9/128" in message and "IPv6 is disabled" in message
    assert "rolled back the 3 change(s) before it" in message
    assert config_of(read(hub)) == config_of(before)
    assert wireguard_go_pids(hub.netns) == pids
    assert_pings(fleet.shop, HUB_IP)
    assert_pings(hub, SHOP_IP)
    assert hub.tunnel.reconcile(hub.spec) == []


def test_a_link_of_the_wrong_type_is_replaced_and_down_removes_it(fleet: Fleet) -> None:
    hub = fleet.hub
    sh(hub.ns, "ip link add wg9 type veth peer name wg9p")
    tunnel = WgTunnel("wg9", KEY_FILE, Runner(), ns=hub.ns)
    spec = TunnelSpec("wg9", 51829, ("10.98.0.1/24",), 1380, ())
    changes = tunnel.reconcile(spec)
    assert [c.kind for c in changes][:2] == ["delete", "create"]
    assert changes[0].reason == "wg9 is a veth link, not WireGuard"
    state = tunnel.read()
    assert state is not None and (state.mtu, state.listen_port) == (1380, 51829)
    before = len(wireguard_go_pids(hub.netns))
    tunnel.down()
    assert tunnel.read() is None
    if state.implementation == "userspace":
        assert len(wireguard_go_pids(hub.netns)) == before - 1
    tunnel.down()  # absent: nothing to do
    assert_pings(fleet.shop, HUB_IP)


def test_a_new_tunnel_object_adopts_the_running_interface(fleet: Fleet) -> None:
    """As after an agent restart: the running interface (and its wireguard-go) is used as is."""
    hub = fleet.hub
    pids, ifindex = wireguard_go_pids(hub.netns), read(hub).ifindex
    again = WgTunnel("wg0", KEY_FILE, Runner(), implementation="auto", ns=hub.ns)
    assert again.reconcile(hub.spec) == []
    assert again.reconcile(hub.spec, dry_run=True) == []
    assert wireguard_go_pids(hub.netns) == pids and read(hub).ifindex == ifindex


def test_kernel_only_without_kernel_wireguard_fails_at_create_and_leaves_nothing(
    fleet: Fleet,
) -> None:
    hub = fleet.hub
    tunnel = WgTunnel("wg8", KEY_FILE, Runner(), implementation="kernel", ns=hub.ns)
    spec = TunnelSpec("wg8", 51828, ("10.97.0.1/24",), 1380, ())
    try:
        tunnel.reconcile(spec)
    except ApplyError as e:
        assert e.step.kind == "create" and e.index == 1 and e.rolled_back
        assert str(e).startswith("wg8: step 1 of ")
        assert "ip link add wg8 type wireguard" in str(e)
        assert tunnel.read() is None
    else:  # this kernel has WireGuard after all
        state = tunnel.read()
        assert state is not None and state.implementation == "kernel"
        tunnel.down()
