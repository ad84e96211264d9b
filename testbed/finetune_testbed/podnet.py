"""The pod network of the process kubelet, and the harness's kube-proxy and cluster DNS.

`PodNetwork`: a Linux bridge with a /16 (10.244.0.0/16, or the next free 10.2xx.0.0/16 if a
route of this machine overlaps it), one network namespace per pod joined to it by a veth
pair, the pod's address from the /16 and a default route through the bridge (Ray finds its
node address from the route). Needs root (`ip netns`, `ip link`). Every name carries the
session's prefix `kl<pid>-`: a later session sweeps what a dead one left (netns, links,
/dev/shm volumes).

`ServiceProxy` stands in for kube-proxy and CoreDNS (this machine has no iptables): it reads
the Services and EndpointSlices (as the admin, as those components read them with their own
identities), writes every sandbox's hosts file (`<svc>.<ns>`, `<svc>.<ns>.svc`,
`<svc>.<ns>.svc.cluster.local`, and `<svc>` for the sandbox's namespace) with the ClusterIP,
or for a headless Service its endpoints' addresses, and gives each ClusterIP a userspace TCP
proxy to the ready endpoints (the address lives on the bridge, so pods reach it through their
default route). The `kubernetes` Service's endpoints are the API server on loopback
(kube-apiserver runs with --endpoint-reconciler-type=none), so pods and the operator reach it
as in-cluster clients do, at its ClusterIP.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import random
import re
import select
import shutil
import socket
import socketserver
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

PREFIX_RE = re.compile(r"^kl(\d+)-")
CANDIDATE_SUBNETS = [f"10.{n}.0.0/16" for n in range(244, 255)]
CLUSTER_DOMAIN = "cluster.local"


class NetworkError(RuntimeError):
    """A pod network step failed (the message names the command and what it printed)."""


def _ip(*args: str, check: bool = True) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep_stale() -> list[str]:
    """Delete the netns, links and /dev/shm volumes of sessions whose process is gone."""
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = PREFIX_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = PREFIX_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    for path in Path("/dev/shm").glob("kl*-*"):
        m = PREFIX_RE.match(path.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("-4", "-o", "route", "show", "table", "all").splitlines():
        dest = line.split()[0]
        if dest in ("default", "local", "broadcast", "unreachable", "blackhole"):
            dest = line.split()[1] if dest != "default" else "0.0.0.0/32"
        try:
            nets.append(ipaddress.ip_network(dest, strict=False))
        except ValueError:
            continue
    return [n for n in nets if n.prefixlen > 0]


def pick_subnet(avoid: tuple[str, ...] = ()) -> ipaddress.IPv4Network:
    used = _used_networks() + [ipaddress.ip_network(a) for a in avoid]
    for cand in map(ipaddress.ip_network, CANDIDATE_SUBNETS):
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise NetworkError(f"no free pod subnet among {CANDIDATE_SUBNETS[0]}..{CANDIDATE_SUBNETS[-1]}")


@dataclass
class Sandbox:
    """A pod's network namespace, address and the files bind-mounted into its containers."""
    name: str          # the netns (and host-side veth) name
    ip: str
    namespace: str     # the Kubernetes namespace, for the short names in its hosts file
    hostname: str
    dir: Path
    veth: str

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def hosts(self) -> Path:
        return self.dir / "hosts"

    @property
    def resolv(self) -> Path:
        return self.dir / "resolv.conf"


class PodNetwork:
    def __init__(self, workdir: Path, avoid: tuple[str, ...] = ()):
        self.prefix = f"kl{os.getpid()}-"
        self.workdir = workdir
        self.avoid = avoid
        self.bridge = f"{self.prefix}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self.sandboxes: dict[str, Sandbox] = {}
        self._next = 2
        self._serial = 0
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] | None = None

    def start(self) -> "PodNetwork":
        sweep_stale()
        self.subnet = pick_subnet(self.avoid)
        self.gateway = str(self.subnet.network_address + 1)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        for name in list(self.sandboxes):
            self.delete_sandbox(name)
        _ip("link", "del", self.bridge, check=False)
        for path in Path("/dev/shm").glob(f"{self.prefix}*"):
            shutil.rmtree(path, ignore_errors=True)

    def _allocate(self) -> str:
        assert self.subnet is not None
        used = {s.ip for s in self.sandboxes.values()}
        while True:
            addr = str(self.subnet.network_address + self._next)
            self._next += 1
            if addr not in used:
                return addr

    def create_sandbox(self, namespace: str, hostname: str) -> Sandbox:
        with self._lock:
            self._serial += 1
            name = f"{self.prefix}{self._serial}"
            ip = self._allocate()
        veth, peer = name, f"{name}p"
        assert len(peer) <= 15, peer
        directory = self.workdir / "pods" / name
        directory.mkdir(parents=True, exist_ok=True)
        sb = Sandbox(name, ip, namespace, hostname, directory, veth)
        sb.resolv.write_text(
            # No DNS server: names are in the hosts file; a refused query fails at once.
            f"search {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
            "nameserver 127.0.0.1\noptions ndots:5 attempts:1 timeout:1\n")
        sb.hosts.write_text(self._hosts_header(sb))
        _ip("netns", "add", name)
        try:
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", name)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "link", "set", peer, "name", "eth0")
            _ip("-n", name, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "route", "add", "default", "via", self.gateway)
        except NetworkError:
            _ip("netns", "del", name, check=False)
            _ip("link", "del", veth, check=False)
            raise
        with self._lock:
            self.sandboxes[name] = sb
        if self.on_change:
            self.on_change()
        return sb

    def delete_sandbox(self, name: str) -> None:
        with self._lock:
            sb = self.sandboxes.pop(name, None)
        _ip("netns", "del", name, check=False)
        _ip("link", "del", name, check=False)
        if sb:
            for path in Path("/dev/shm").glob(f"{name}-*"):
                shutil.rmtree(path, ignore_errors=True)

    def memory_volume(self, sb: Sandbox, volume: str) -> Path:
        """An emptyDir with medium Memory: a directory on the host's tmpfs."""
        path = Path("/dev/shm") / f"{sb.name}-{volume}"
        path.mkdir(exist_ok=True)
        return path

    @staticmethod
    def _hosts_header(sb: Sandbox) -> str:
        # What the kubelet writes into a pod's /etc/hosts.
        return ("# Kubernetes-managed hosts file (finetune_testbed.podnet).\n"
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                f"{sb.ip}\t{sb.hostname}\n")

    def write_hosts(self, entries: list[tuple[str, str, str]]) -> None:
        """entries: (ip, service, namespace). Rewritten in place: each container's /etc/hosts
        is a bind mount of the file, which a rename would leave behind."""
        with self._lock:
            sandboxes = list(self.sandboxes.values())
        for sb in sandboxes:
            lines = [self._hosts_header(sb)]
            for ip, svc, ns in entries:
                names = [f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{CLUSTER_DOMAIN}"]
                if ns == sb.namespace:
                    names.insert(0, svc)
                lines.append(f"{ip}\t{' '.join(names)}\n")
            text = "".join(lines)
            try:
                if sb.hosts.read_text() == text:
                    continue
                with open(sb.hosts, "r+") as fh:
                    fh.write(text)
                    fh.truncate()
            except FileNotFoundError:
                continue


# ---------------------------------------------------------------- kube-proxy stand-in

class _Pump(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        backends = self.server.backends()  # type: ignore[attr-defined]
        if not backends:
            return  # no ready endpoint: the connection is refused, as kube-proxy rejects it
        host, port = random.choice(backends)
        try:
            upstream = socket.create_connection((host, port), timeout=10)
        except OSError:
            return
        upstream.settimeout(None)
        client = self.request
        socks = [client, upstream]
        try:
            while True:
                readable, _, _ = select.select(socks, [], [], 300)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is client else client).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], backends: Callable[[], list[tuple[str, int]]]):
        self.backends = backends
        super().__init__(addr, _Pump)


@dataclass
class _Port:
    listener: _Listener
    thread: threading.Thread
    backends: list[tuple[str, int]] = field(default_factory=list)


class ServiceProxy:
    """kube-proxy (userspace, TCP) and cluster DNS (hosts files) for the pod network."""

    def __init__(self, network: PodNetwork, request: Callable[..., tuple[int, dict]],
                 apiserver: str, interval: float = 1.0):
        self.network = network
        self.request = request
        api = urlparse(apiserver)
        self.apiserver = (api.hostname or "127.0.0.1", api.port or 443)
        self.interval = interval
        self.ports: dict[tuple[str, int], _Port] = {}
        self.cluster_ips: set[str] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="service-proxy", daemon=True)
        network.on_change = self._wake.set

    def start(self) -> "ServiceProxy":
        self.sync()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for port in self.ports.values():
            port.listener.shutdown()
            port.listener.server_close()
        self.ports.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except Exception as exc:  # keep serving; the test reads errors at the end
                self.errors.append(repr(exc))

    def sync(self) -> None:
        code, services = self.request("GET", "/api/v1/services")
        if code != 200:
            raise NetworkError(f"listing Services: {code} {services.get('message')}")
        code, slices = self.request("GET", "/apis/discovery.k8s.io/v1/endpointslices")
        if code != 200:
            raise NetworkError(f"listing EndpointSlices: {code} {slices.get('message')}")
        by_service: dict[tuple[str, str], list[dict]] = {}
        for sl in slices.get("items", []):
            meta = sl["metadata"]
            svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
            if svc:
                by_service.setdefault((meta["namespace"], svc), []).append(sl)
        entries: list[tuple[str, str, str]] = []
        wanted: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for svc in services.get("items", []):
            meta, spec = svc["metadata"], svc["spec"]
            ns, name = meta["namespace"], meta["name"]
            ready = [(ep, sl) for sl in by_service.get((ns, name), [])
                     for ep in sl.get("endpoints") or []
                     if (ep.get("conditions") or {}).get("ready", True)]
            cluster_ip = spec.get("clusterIP")
            if cluster_ip in (None, "", "None"):
                for ep, _ in ready:
                    for addr in ep.get("addresses", []):
                        entries.append((addr, name, ns))
                continue
            entries.append((cluster_ip, name, ns))
            for port in spec.get("ports", []):
                if port.get("protocol", "TCP") != "TCP":
                    continue
                if (ns, name) == ("default", "kubernetes"):
                    backends = [self.apiserver]
                else:
                    backends = [(addr, p["port"]) for ep, sl in ready
                                for p in sl.get("ports") or []
                                if p.get("name", "") == port.get("name", "")
                                for addr in ep.get("addresses", [])]
                wanted[(cluster_ip, port["port"])] = backends
        self.network.write_hosts(entries)
        self._reconcile_ports(wanted)

    def _reconcile_ports(self, wanted: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
        for key in [k for k in self.ports if k not in wanted]:
            port = self.ports.pop(key)
            port.listener.shutdown()
            port.listener.server_close()
        for (ip, number), backends in wanted.items():
            if ip not in self.cluster_ips:
                _ip("addr", "add", f"{ip}/32", "dev", self.network.bridge, check=False)
                self.cluster_ips.add(ip)
            if (ip, number) in self.ports:
                self.ports[(ip, number)].backends[:] = backends
                continue
            holder: list[tuple[str, int]] = list(backends)
            listener = _Listener((ip, number), lambda h=holder: list(h))
            thread = threading.Thread(target=listener.serve_forever, daemon=True,
                                      name=f"proxy-{ip}:{number}")
            thread.start()
            self.ports[(ip, number)] = _Port(listener, thread, holder)
