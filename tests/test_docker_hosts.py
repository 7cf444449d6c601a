"""Which daemon the reference client reaches, and how, resolved as the docker CLI resolves it: ``DOCKER_HOST``,
``DOCKER_CONTEXT`` and ``currentContext`` (contexts in a temporary DOCKER_CONFIG), tcp:// with TLS (a
TLS-terminating proxy in front of the reference daemon's unix socket, certificates made here), ssh:// (a private
sshd from Debian's openssh-server), and connection errors that name the host."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conformance import peers, realpeers
from conformance.trees import write_file
from reference.client import build
from reference.errors import SessionError
from reference.dockerhost import (ContextNotFound, DaemonConnectionError, TlsFiles, _pump_tls, _ssl_context,
                                  api_call, resolve_endpoint, ssh_command)

from test_daemon import RefDaemon  # noqa: E402  (same tests directory)

SSHD = "/usr/sbin/sshd"
CLIENT_VARS = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_TLS_VERIFY", "DOCKER_TLS",
               "DOCKER_CERT_PATH")


@pytest.fixture(scope="module")
def refd(tmp_path_factory):
    d = RefDaemon(str(tmp_path_factory.mktemp("refd") / "root"))
    yield d
    d.close()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No docker client variable from the caller; DOCKER_CONFIG is an empty directory of the test's."""
    for name in CLIENT_VARS:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "docker-config"
    config.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    return config


@pytest.fixture
def context_dir(tmp_path):
    ctx = tmp_path / "ctx"
    write_file(str(ctx), "Dockerfile", b"FROM scratch\nCOPY hello /hello\n")
    write_file(str(ctx), "hello", b"hello\n")
    return str(ctx)


def add_context(config, name: str, host: str, *, skip_tls_verify: bool = False, tls_from=None) -> None:
    """The files ``docker context create NAME --docker host=HOST[,ca=,cert=,key=]`` writes."""
    context_id = hashlib.sha256(name.encode()).hexdigest()
    meta = config / "contexts" / "meta" / context_id
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps({
        "Name": name, "Metadata": {},
        "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": skip_tls_verify}}}))
    if tls_from is not None:
        tls = config / "contexts" / "tls" / context_id / "docker"
        tls.mkdir(parents=True)
        for file in ("ca.pem", "cert.pem", "key.pem"):
            shutil.copy(tls_from / file, tls / file)


def built_image(result) -> str:
    assert result.image_id and result.image_id.startswith("sha256:"), result
    return result.image_id


# -- contexts ----------------------------------------------------------------------------------------------

def test_current_context_in_config_json(refd, clean_env, context_dir):
    add_context(clean_env, "ref", refd.host)
    (clean_env / "config.json").write_text(json.dumps({"currentContext": "ref"}))
    assert resolve_endpoint().host == refd.host and resolve_endpoint().context == "ref"
    built_image(build(context_dir, generation="n"))


def test_docker_context_overrides_and_docker_host_wins(refd, clean_env, context_dir, monkeypatch, tmp_path):
    add_context(clean_env, "ref", refd.host)
    add_context(clean_env, "broken", f"unix://{tmp_path}/nothing.sock")
    (clean_env / "config.json").write_text(json.dumps({"currentContext": "broken"}))
    with pytest.raises(DaemonConnectionError) as info:
        build(context_dir, generation="n")
    assert info.value.host == f"unix://{tmp_path}/nothing.sock"
    monkeypatch.setenv("DOCKER_CONTEXT", "ref")
    built_image(build(context_dir, generation="n+1"))
    # DOCKER_HOST comes before any context, as in the docker CLI
    monkeypatch.setenv("DOCKER_CONTEXT", "broken")
    monkeypatch.setenv("DOCKER_HOST", refd.host)
    assert resolve_endpoint().context == "default"
    built_image(build(context_dir, generation="n"))


def test_an_unknown_context_is_named(clean_env, monkeypatch, context_dir):
    monkeypatch.setenv("DOCKER_CONTEXT", "nope")
    with pytest.raises(ContextNotFound, match="context 'nope' not found"):
        build(context_dir)


def test_cli_uses_the_context(refd, clean_env, context_dir):
    add_context(clean_env, "ref", refd.host)
    env = {**os.environ, "DOCKER_CONTEXT": "ref"}
    run = subprocess.run([sys.executable, "-m", "reference.client", "build", "--progress", "quiet", context_dir],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("sha256:"), run.stderr


# -- connection errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("host_of", [lambda tmp: f"unix://{tmp}/nope.sock", lambda tmp: "tcp://127.0.0.1:1"])
def test_unreachable_daemon_is_named_by_api_and_cli(clean_env, context_dir, tmp_path, host_of):
    host = host_of(tmp_path)
    expected = f"Cannot connect to the Docker daemon at {host}. Is the docker daemon running?"
    with pytest.raises(DaemonConnectionError) as info:
        build(context_dir, host=host)
    assert (str(info.value), info.value.host) == (expected, host)
    assert isinstance(info.value, OSError)  # callers that caught the OSError before still do
    env = {**os.environ, "DOCKER_HOST": host}
    run = subprocess.run([sys.executable, "-m", "reference.client", "build", context_dir], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip() == f"error: {expected}", run.stderr


# -- tcp:// with TLS ------------------------------------------------------------------------------------------

def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False, server=False):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_pki(directory, ca_cert, ca_key, leaf: str, server: bool):
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(leaf, key, ca_cert, ca_key, server=server)
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the proxy's server certificate (localhost) and a client certificate; and a second, unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("test ca", ca_key, ca=True)
    _write_pki(root / "server", ca_cert, ca_key, "localhost", server=True)
    _write_pki(root / "client", ca_cert, ca_key, "client", server=False)
    other_key = ec.generate_private_key(ec.SECP256R1())
    _write_pki(root / "other", _cert("other ca", other_key, ca=True), other_key, "client", server=False)
    return root


class TlsProxy:
    """TLS on 127.0.0.1 (client certificates required, from the test CA) in front of a unix socket: dockerd's
    --tlsverify, for a daemon that speaks no TLS."""

    def __init__(self, backend_host: str, server_dir):
        self.backend = backend_host[len("unix://"):]
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(server_dir / "ca.pem"))
        self.context.verify_mode = ssl.CERT_REQUIRED
        # As dockerd (Go) verifies client certificates: not X509-strict, Python 3.13's default.
        self.context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        self.context.load_cert_chain(str(server_dir / "cert.pem"), str(server_dir / "key.pem"))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes_failed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            tls = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            self.handshakes_failed += 1
            raw.close()
            return
        backend = socket.socket(socket.AF_UNIX)
        backend.connect(self.backend)
        _pump_tls(tls, backend)  # the client's own one-thread TLS pump serves the proxy's side as well

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def tls_proxy(refd, pki):
    proxy = TlsProxy(refd.host, pki / "server")
    yield proxy
    proxy.close()


def test_tls_verify_and_cert_path(tls_proxy, pki, clean_env, monkeypatch, context_dir):
    monkeypatch.setenv("DOCKER_HOST", f"tcp://localhost:{tls_proxy.port}")
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    monkeypatch.setenv("DOCKER_CERT_PATH", str(pki / "client"))
    assert resolve_endpoint().tls == TlsFiles(*(str(pki / "client" / f) for f in ("ca.pem", "cert.pem", "key.pem")),
                                              verify=True)
    # the whole build over TLS: /session and /grpc upgrade the TLS connection, HTTP/2 runs inside it
    built_image(build(context_dir, generation="n+1"))
    built_image(build(context_dir, generation="n", transport="grpcio"))
    # without TLS the proxy sees no handshake it accepts, and says nothing an HTTP client could read
    monkeypatch.delenv("DOCKER_TLS_VERIFY")
    failed = tls_proxy.handshakes_failed
    with pytest.raises((SessionError, ConnectionResetError)):  # closed or reset, as the proxy's close falls
        api_call("GET", "/_ping", timeout=5)
    # The proxy may send its TLS alert, which ends the client's call, before its thread counts the failure.
    deadline = time.monotonic() + 5
    while tls_proxy.handshakes_failed == failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tls_proxy.handshakes_failed > failed


def test_tls_with_the_wrong_ca_is_refused_and_named(tls_proxy, pki, clean_env, monkeypatch, context_dir):
    host = f"tcp://localhost:{tls_proxy.port}"
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    monkeypatch.setenv("DOCKER_CERT_PATH", str(pki / "other"))
    with pytest.raises(DaemonConnectionError) as info:
        build(context_dir, host=host)
    assert info.value.host == host and "certificate verify failed" in str(info.value), str(info.value)


def test_tls_context(tls_proxy, pki, clean_env, monkeypatch, context_dir):
    add_context(clean_env, "tls", f"tcp://localhost:{tls_proxy.port}", tls_from=pki / "client")
    monkeypatch.setenv("DOCKER_CONTEXT", "tls")
    assert resolve_endpoint().tls.verify and resolve_endpoint().tls.cert
    built_image(build(context_dir, generation="n"))


def test_tls_is_verified_as_the_docker_cli_verifies_not_x509_strict(pki):
    """Python 3.13's default context (Debian 13's python3) is X509-strict: it refused the test CA's certificates,
    which the docker CLI takes, with "Missing Authority Key Identifier". The certificates keep lacking one."""
    leaf = x509.load_pem_x509_certificate((pki / "client" / "cert.pem").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    context = _ssl_context(TlsFiles(str(pki / "client" / "ca.pem"), None, None, verify=True))
    assert not context.verify_flags & ssl.VERIFY_X509_STRICT
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_the_docker_cli_accepts_the_tls_proxy(tls_proxy, pki, tmp_path):
    """The proxy is a TLS Docker endpoint as the docker CLI 20.10 knows one (so the tests above test TLS
    as dockerd serves it)."""
    realpeers.require_docker("docker-cli-20.10")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(peers.client_env("docker-cli-20.10", str(tmp_path / "cfg")),
               DOCKER_HOST=f"tcp://localhost:{tls_proxy.port}", DOCKER_TLS_VERIFY="1",
               DOCKER_CERT_PATH=str(pki / "client"))
    run = subprocess.run([peers.binary("docker-cli-20.10"), "version", "--format", "{{.Server.APIVersion}}"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "1.41", run.stderr


# -- ssh:// ---------------------------------------------------------------------------------------------------

def test_ssh_command_is_the_docker_clis():
    assert ssh_command("ssh://me@example:2222") == [
        "ssh", "-o", "ConnectTimeout=30", "-T", "-l", "me", "-p", "2222", "--", "example",
        "docker", "system", "dial-stdio"]
    assert ssh_command("ssh://example/run/d.sock")[-6:] == [
        "example", "docker", "--host", "unix:///run/d.sock", "system", "dial-stdio"]


class PrivateSshd:
    """Debian's sshd on 127.0.0.1, keys of its own, one authorized key whose forced command records what the
    client asked for and runs the docker CLI 20.10 peer's ``system dial-stdio`` to ``backend``."""

    def __init__(self, directory, backend_host: str):
        self.dir = directory
        self.requests = directory / "requests.log"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "client_key")],
                       check=True)
        forced = directory / "dial-stdio"
        forced.write_text(f'#!/bin/sh\necho "$SSH_ORIGINAL_COMMAND" >> {self.requests}\n'
                          f"DOCKER_HOST={backend_host} exec {peers.binary('docker-cli-20.10')} system dial-stdio\n")
        forced.chmod(0o755)
        public = (directory / "client_key.pub").read_text().strip()
        (directory / "authorized_keys").write_text(f'command="{forced}",no-pty,no-port-forwarding {public}\n')
        with socket.create_server(("127.0.0.1", 0)) as probe:
            self.port = probe.getsockname()[1]
        config = directory / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {directory / 'host_key'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
            "PidFile none", "LogLevel ERROR", ""]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # the privilege separation directory sshd requires
        self.log = open(directory / "sshd.log", "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start: " + (directory / "sshd.log").read_text())
                time.sleep(0.05)
        known = directory / "known_hosts"
        host_public = (directory / "host_key.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_public)}\n")
        # ssh reads ~/.ssh of the passwd entry, not $HOME: a wrapper first on PATH gives it this test's files
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        (bin_dir / "ssh").write_text(
            "#!/bin/sh\nexec /usr/bin/ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes "
            f"-o IdentityFile={directory / 'client_key'} -o UserKnownHostsFile={known} "
            "-o StrictHostKeyChecking=yes \"$@\"\n")
        (bin_dir / "ssh").chmod(0o755)
        self.path = f"{bin_dir}:{os.environ.get('PATH', '')}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def sshd(refd, tmp_path_factory):
    if not os.path.exists(SSHD) or not shutil.which("ssh"):
        reason = "sshd or ssh missing: install Debian's openssh-server and openssh-client (.ci/install-system-deps)"
        if realpeers.running_in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    realpeers.require_docker("docker-cli-20.10")
    d = PrivateSshd(tmp_path_factory.mktemp("sshd"), refd.host)
    yield d
    d.close()


def test_ssh_host(sshd, clean_env, monkeypatch, context_dir):
    monkeypatch.setenv("PATH", sshd.path)
    monkeypatch.setenv("DOCKER_HOST", f"ssh://root@127.0.0.1:{sshd.port}")
    built_image(build(context_dir, generation="n"))
    built_image(build(context_dir, generation="n+1"))
    asked = sshd.requests.read_text().splitlines()
    assert asked and set(asked) == {"docker system dial-stdio"}, asked


def test_ssh_failure_is_named(sshd, clean_env, monkeypatch, context_dir, tmp_path):
    monkeypatch.setenv("PATH", sshd.path)
    host = f"ssh://nobody-here@127.0.0.1:{sshd.port}"  # no such user: sshd refuses the key
    with pytest.raises(DaemonConnectionError) as info:
        build(context_dir, host=host)
    assert info.value.host == host and "ssh exited with status 255" in str(info.value), str(info.value)
    assert "Permission denied" in info.value.reason


def test_contexts_written_by_the_docker_cli(tls_proxy, refd, pki, clean_env, context_dir):
    """`docker context create` and `docker context use` of the docker CLI 20.10 write what the client reads."""
    realpeers.require_docker("docker-cli-20.10")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(peers.client_env("docker-cli-20.10", str(clean_env)))
    client = pki / "client"

    def cli(*args):
        run = subprocess.run([peers.binary("docker-cli-20.10"), *args], env=env, capture_output=True, text=True,
                             timeout=30)
        assert run.returncode == 0, run.stderr

    cli("context", "create", "viatls", "--docker", f"host=tcp://localhost:{tls_proxy.port},ca={client}/ca.pem,"
        f"cert={client}/cert.pem,key={client}/key.pem")
    cli("context", "create", "viaunix", "--docker", f"host={refd.host}")
    cli("context", "use", "viatls")
    endpoint = resolve_endpoint()
    assert (endpoint.context, endpoint.host) == ("viatls", f"tcp://localhost:{tls_proxy.port}")
    assert endpoint.tls.verify and endpoint.tls.ca and endpoint.tls.cert and endpoint.tls.key
    built_image(build(context_dir, generation="n"))
    cli("context", "use", "viaunix")
    assert resolve_endpoint().host == refd.host and resolve_endpoint().tls is None
    built_image(build(context_dir, generation="n"))
