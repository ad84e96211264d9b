"""A real Kubernetes control plane on loopback, started from Python.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the KubeRay operator, built
by `kubestack/build.sh` from their published Go modules, run here as local processes the way
a cluster runs them: TLS everywhere with a CA generated for the run, client certificates for
the control-plane components (their RBAC bootstrap users), service-account tokens signed by a
key of the run, `--authorization-mode=Node,RBAC`, the default admission plugins plus
NodeRestriction. KubeRay runs as its own ServiceAccount with the ClusterRole its module ships.

    stack = KubeStack.start()          # ~ seconds, warm
    stack.kubectl("get", "ns")
    stack.stop()                       # also at interpreter exit, and if this process dies

`python -m finetune_testbed.kubestack` (what `make cluster` runs) starts one and prints the
admin kubeconfig; Ctrl-C stops it.

Every child runs in its own process group with PR_SET_PDEATHSIG, so a test session that ends
in any way (even SIGKILL) takes the control plane with it; `stop()` and `atexit` end them
cleanly first.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .ports import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "kubestack" / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
            "kuberay-operator")
FINETUNE_CRDS = REPO / "crds"
SERVICE_CIDR = "10.0.0.0/24"
# The `kubernetes` Service's ClusterIP: the first address of the range.
KUBERNETES_SERVICE_IP = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBERAY_NAMESPACE = "kuberay-system"
KUBERAY_SA = "kuberay-operator"
START_TIMEOUT = 120.0


class StackError(RuntimeError):
    """The control plane could not be built or started (the message names the component)."""


def bin_dir() -> Path:
    """Where build.sh puts (or would put) the binaries for the current go.sum files;
    KUBESTACK_BIN names another directory of the same layout."""
    if os.environ.get("KUBESTACK_BIN"):
        return Path(os.environ["KUBESTACK_BIN"])
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print"], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip())


def binaries_present(directory: Path | None = None) -> bool:
    directory = directory or bin_dir()
    return all((directory / b).is_file() for b in BINARIES)


# ---------------------------------------------------------------- certificates and keys

def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """The run's cluster CA: it signs the API server's serving certificate and every client
    certificate (admin, controller-manager, scheduler, nodes)."""

    def __init__(self, common_name: str = "kubestack-ca"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.cert_pem = _pem_cert(self.cert)

    def issue(self, common_name: str, organizations: tuple[str, ...] = (), *,
              dns_names: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              server: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM). Kubernetes reads a client's user from CN and its
        groups from O."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _pem_cert(builder.sign(self.key, hashes.SHA256())), _pem_key(key)


def kubeconfig(server: str, ca_pem: bytes, user: str, *, cert_pem: bytes | None = None,
               key_pem: bytes | None = None, token: str | None = None) -> str:
    """A kubeconfig (JSON, which is YAML) with everything embedded."""
    b64 = lambda data: __import__("base64").b64encode(data).decode()  # noqa: E731
    creds: dict[str, str] = {}
    if cert_pem is not None:
        creds = {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}
    if token is not None:
        creds = {"token": token}
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubestack",
        "clusters": [{"name": "kubestack", "cluster": {
            "server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "kubestack", "context": {"cluster": "kubestack", "user": user}}],
    }, indent=2)


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # The kernel kills the child when this process dies, however it dies.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- the stack

@dataclass
class KubeStack:
    bin: Path
    workdir: Path
    ca: CertificateAuthority = field(default_factory=CertificateAuthority)
    components: dict[str, Component] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    server: str = ""
    admin_kubeconfig: Path = Path()
    # An audit policy (audit.k8s.io/v1 Policy) for the API server, and where its log goes
    # (workdir/audit.log); None: no auditing, as before.
    audit_policy: dict[str, Any] | None = None
    audit_log: Path | None = None
    _owns_workdir: bool = False

    # -- lifecycle

    @classmethod
    def start(cls, bin: Path | None = None, workdir: Path | None = None,
              audit_policy: dict[str, Any] | None = None) -> "KubeStack":
        """`audit_policy`: the API server logs the requests it selects to `stack.audit_log`
        (JSON lines, one audit Event each), e.g. to count a client's calls by its user."""
        bin = bin or bin_dir()
        if not binaries_present(bin):
            raise StackError(f"kubestack binaries missing in {bin}: run kubestack/build.sh")
        owns = workdir is None
        workdir = workdir or Path(tempfile.mkdtemp(prefix="kubestack-"))
        stack = cls(bin=bin, workdir=workdir, audit_policy=audit_policy, _owns_workdir=owns)
        atexit.register(stack.stop)
        try:
            stack._start_all()
        except BaseException:
            stack.stop()
            raise
        return stack

    def _start_all(self) -> None:
        t0 = time.monotonic()
        self._write_pki()
        self._start_etcd()
        self._start_apiserver()
        self.timings["apiserver ready"] = time.monotonic() - t0
        self._start_controller_manager()
        self._start_scheduler()
        self._install_crds()
        self._start_kuberay()
        self._wait_controllers()
        self.timings["total"] = time.monotonic() - t0

    def stop(self) -> None:
        for comp in reversed(list(self.components.values())):
            if comp.proc.poll() is None:
                try:
                    os.killpg(comp.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for comp in self.components.values():
            try:
                comp.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(comp.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                comp.proc.wait()
        self.components.clear()
        if self._owns_workdir and self.workdir.exists() and not os.environ.get("KUBESTACK_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "KubeStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers the tests use

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = ["kubectl", "--kubeconfig", str(kubeconfig or self.admin_kubeconfig), *args]
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                             env=_child_env())
        if check and out.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out

    def apply(self, objects: list[dict[str, Any]] | dict[str, Any], **kw: Any) -> None:
        docs = objects if isinstance(objects, list) else [objects]
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
                     **kw)

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                client_cert: tuple[Path, Path] | None = None,
                content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        """One API call: as the admin, as `token`'s subject, or as the owner of
        `client_cert` (certificate, key). Returns (HTTP status, decoded body)."""
        ctx = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        headers = {"Accept": "application/json"}
        if token is None:
            ctx.load_cert_chain(*(client_cert or (self.workdir / "admin.crt",
                                                  self.workdir / "admin.key")))
        else:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, {"message": raw.decode(errors="replace")}

    def service_account_token(self, namespace: str, name: str, seconds: int = 86400) -> str:
        """A token for the ServiceAccount, issued by the API server (TokenRequest), as a pod
        of that ServiceAccount gets."""
        status, body = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}})
        if status != 201:
            raise StackError(f"TokenRequest for {namespace}/{name}: {status} {body}")
        return body["status"]["token"]

    def token_kubeconfig(self, name: str, token: str, server: str | None = None) -> Path:
        """A kubeconfig with `token`; `server` (e.g. the `kubernetes` Service's ClusterIP,
        for a process on the pod network) instead of the API server's loopback address."""
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(kubeconfig(server or self.server, self.ca.cert_pem, name, token=token))
        path.chmod(0o600)
        return path

    def client_certificate_kubeconfig(self, name: str, user: str,
                                      groups: tuple[str, ...] = ()) -> Path:
        cert, key = self.ca.issue(user, groups)
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(kubeconfig(self.server, self.ca.cert_pem, user, cert_pem=cert,
                                   key_pem=key))
        path.chmod(0o600)
        return path

    def alive(self) -> dict[str, bool]:
        return {name: c.proc.poll() is None for name, c in self.components.items()}

    # -- the steps

    def _write_pki(self) -> None:
        w = self.workdir
        (w / "ca.crt").write_bytes(self.ca.cert_pem)
        cert, key = self.ca.issue(
            "kube-apiserver", server=True, ips=("127.0.0.1", KUBERNETES_SERVICE_IP),
            dns_names=("localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
        (w / "apiserver.crt").write_bytes(cert)
        (w / "apiserver.key").write_bytes(key)
        # The cluster admin, as kubeadm makes it: a member of system:masters.
        cert, key = self.ca.issue("kubestack-admin", ("system:masters",))
        (w / "admin.crt").write_bytes(cert)
        (w / "admin.key").write_bytes(key)
        # Service-account tokens: the API server signs them, the token controller too.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (w / "sa.key").write_bytes(_pem_key(sa_key))
        (w / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        for p in w.glob("*.key"):
            p.chmod(0o600)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Component:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(self.bin / args[0]), *args[1:]], stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.workdir, env=_child_env(env),
                                    start_new_session=True, preexec_fn=_die_with_parent)
        comp = Component(name, proc, log)
        self.components[name] = comp
        return comp

    def _wait(self, comp: Component, what: str, probe, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if comp.proc.poll() is not None:
                raise StackError(f"{comp.name} exited ({comp.proc.returncode}) before {what}:\n"
                                 f"{comp.tail()}")
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError):
                pass
            time.sleep(0.1)
        raise StackError(f"{comp.name}: not {what} after {timeout:.0f} s:\n{comp.tail()}")

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        comp = self._spawn("etcd", [
            "etcd", "--name", "kubestack", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"kubestack=http://127.0.0.1:{peer}",
            # A throw-away cluster for one test session: durability buys nothing here.
            "--unsafe-no-fsync", "--log-level", "warn"])

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        self._wait(comp, "healthy", healthy)

    def _start_apiserver(self) -> None:
        w = self.workdir
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        comp = self._spawn("kube-apiserver", [
            "kube-apiserver",
            "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(port),
            "--tls-cert-file", str(w / "apiserver.crt"),
            "--tls-private-key-file", str(w / "apiserver.key"),
            "--client-ca-file", str(w / "ca.crt"),
            "--service-account-issuer", SA_ISSUER,
            "--service-account-key-file", str(w / "sa.pub"),
            "--service-account-signing-key-file", str(w / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "Node,RBAC",
            # The default set (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity,
            # DefaultTolerationSeconds, ResourceQuota, the admission webhooks and
            # policies, ...) plus NodeRestriction, as kubeadm configures it, and
            # OwnerReferencesPermissionEnforcement, as OpenShift runs it (an owner reference
            # with blockOwnerDeletion needs `update` on the owner's finalizers).
            "--enable-admission-plugins", "NodeRestriction,OwnerReferencesPermissionEnforcement",
            "--allow-privileged=true",
            # The `kubernetes` Service's endpoints would be the advertise address, and
            # Endpoints refuse loopback addresses; nothing here dials that Service.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            *self._audit_args(),
        ])
        ctx = ssl.create_default_context(cafile=str(w / "ca.crt"))
        ctx.load_cert_chain(w / "admin.crt", w / "admin.key")

        def ready() -> bool:
            try:
                with urllib.request.urlopen(self.server + "/readyz", context=ctx,
                                            timeout=5) as r:
                    return r.status == 200
            except urllib.error.HTTPError:
                return False
        self._wait(comp, "ready", ready)
        self.admin_kubeconfig = w / "admin.kubeconfig"
        self.admin_kubeconfig.write_text(kubeconfig(
            self.server, self.ca.cert_pem, "kubestack-admin",
            cert_pem=(w / "admin.crt").read_bytes(), key_pem=(w / "admin.key").read_bytes()))
        self.admin_kubeconfig.chmod(0o600)

    def _audit_args(self) -> list[str]:
        if self.audit_policy is None:
            return []
        policy = self.workdir / "audit-policy.json"  # JSON is YAML, which the flag reads
        policy.write_text(json.dumps(self.audit_policy))
        self.audit_log = self.workdir / "audit.log"
        # No rotation within a run (the default rotates at 100 MB): readers keep an offset.
        return ["--audit-policy-file", str(policy), "--audit-log-path", str(self.audit_log),
                "--audit-log-maxsize", "100000", "--audit-log-format", "json"]

    def _start_controller_manager(self) -> None:
        w = self.workdir
        kc = self.client_certificate_kubeconfig("kube-controller-manager",
                                                "system:kube-controller-manager")
        self._kcm_port = free_port()
        self._spawn("kube-controller-manager", [
            "kube-controller-manager", "--kubeconfig", str(kc),
            "--authentication-kubeconfig", str(kc), "--authorization-kubeconfig", str(kc),
            "--bind-address", "127.0.0.1", "--secure-port", str(self._kcm_port),
            "--leader-elect=false",
            # Each controller with its own ServiceAccount and RBAC role, as in a cluster.
            "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(w / "sa.key"),
            "--root-ca-file", str(w / "ca.crt"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--controllers", "*",
        ])

    def _start_scheduler(self) -> None:
        kc = self.client_certificate_kubeconfig("kube-scheduler", "system:kube-scheduler")
        self._sched_port = free_port()
        self._spawn("kube-scheduler", [
            "kube-scheduler", "--kubeconfig", str(kc),
            "--authentication-kubeconfig", str(kc), "--authorization-kubeconfig", str(kc),
            "--bind-address", "127.0.0.1", "--secure-port", str(self._sched_port),
            "--leader-elect=false",
        ])

    def _healthz(self, port: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the component's own self-signed serving cert
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx,
                                        timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def _install_crds(self) -> None:
        import yaml  # the CRD files are YAML

        crd_files = sorted(FINETUNE_CRDS.glob("*.yaml")) + sorted((self.bin / "crds").glob("*.yaml"))
        names = []
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        # libyaml's loader: KubeRay's CRDs are megabytes of YAML (~15 s each in pure Python).
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        for f in crd_files:
            crd = yaml.load(f.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
            status, body = self.request("POST", base, crd)
            if status != 201:
                raise StackError(f"installing {f.name}: {status} {body.get('message')}")
            names.append(crd["metadata"]["name"])

        def established() -> bool:
            for name in names:
                _, crd = self.request("GET", f"{base}/{name}")
                conds = {c["type"]: c["status"]
                         for c in (crd.get("status") or {}).get("conditions") or []}
                if conds.get("Established") != "True":
                    return False
            return True
        self._wait(self.components["kube-apiserver"], "serving the CRDs", established)

    def _start_kuberay(self) -> None:
        import yaml  # the role file is YAML with comments

        role = yaml.safe_load((self.bin / "rbac" / "kuberay-operator-role.yaml").read_text())
        self.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUBERAY_NAMESPACE}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": KUBERAY_SA, "namespace": KUBERAY_NAMESPACE}},
            role,
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": role["metadata"]["name"]},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": role["metadata"]["name"]},
             "subjects": [{"kind": "ServiceAccount", "name": KUBERAY_SA,
                           "namespace": KUBERAY_NAMESPACE}]},
        ])
        token = self.service_account_token(KUBERAY_NAMESPACE, KUBERAY_SA)
        kc = self.token_kubeconfig("kuberay-operator", token)
        metrics, probe = free_port(), free_port()
        self._kuberay_probe = probe
        # controller-runtime reads KUBECONFIG, as it reads the pod's token in a cluster.
        comp = self._spawn("kuberay-operator", [
            "kuberay-operator",
            "--metrics-addr", f"127.0.0.1:{metrics}",
            "--health-probe-bind-address", f"127.0.0.1:{probe}",
            "--enable-leader-election=false", "--log-stdout-encoder", "console",
        ], env={"KUBECONFIG": str(kc)})

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{probe}/readyz", timeout=2) as r:
                    return r.status == 200
            except urllib.error.HTTPError:
                return False
        self._wait(comp, "ready", ready)

    def _wait_controllers(self) -> None:
        self._wait(self.components["kube-controller-manager"], "healthy",
                   lambda: self._healthz(self._kcm_port))
        self._wait(self.components["kube-scheduler"], "healthy",
                   lambda: self._healthz(self._sched_port))

        # The service-account controller has run once it made `default` in `default`.
        def default_sa() -> bool:
            status, _ = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200
        self._wait(self.components["kube-controller-manager"], "making ServiceAccounts",
                   default_sa)


def main() -> int:
    print("building (or finding) the binaries ...", file=sys.stderr)
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    stack = KubeStack.start()
    print(f"control plane ready in {stack.timings['total']:.1f} s "
          f"(API server {stack.timings['apiserver ready']:.1f} s)", file=sys.stderr)
    print(f"export KUBECONFIG={stack.admin_kubeconfig}")
    print("Ctrl-C stops it.", file=sys.stderr)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
