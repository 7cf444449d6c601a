"""The real peers of both vintages (conformance/peers): catalogue, installer pieces, list, start, and a real
build of each CLI into each daemon."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import peers, realpeers
from conformance.peers import catalogue, install

ROOT = Path(__file__).resolve().parent.parent


# -- no daemon needed -------------------------------------------------------------------------------

@pytest.mark.parametrize("version, upstream", [
    ("20.10.24+dfsg1-1+deb12u1+b6", "20.10.24"),
    ("1.6.20~ds1-1+deb12u3", "1.6.20"),
    ("0.19.0-1+b3", "0.19.0"),
    ("1:1.35.0-4+deb12u1", "1.35.0"),
])
def test_a_substitute_version_must_be_the_same_upstream_release(version, upstream):
    assert catalogue.Package("x", version, "bookworm").upstream == upstream


def test_every_program_belongs_to_a_vintage_and_every_vintage_has_a_daemon_and_a_client():
    for program in catalogue.PROGRAMS.values():
        assert program.vintage in catalogue.VINTAGES and program.kind in ("daemon", "client")
    for vintage in catalogue.VINTAGES:
        kinds = {p.kind for p in catalogue.PROGRAMS.values() if p.vintage == vintage}
        assert kinds == {"daemon", "client"}, vintage
    assert {v.generation for v in catalogue.VINTAGES.values()} == {"n", "n+1"}


def test_choose_version_takes_the_pin_or_the_same_release_and_refuses_another(tmp_path):
    pin = catalogue.Package("docker.io", "20.10.24+dfsg1-1+deb12u1+b6", "bookworm")
    exact = {("docker.io", "bookworm"): ["20.10.24+dfsg1-1+deb12u1+b6"]}
    assert install._choose_version(exact, pin, "A") == (pin.version, [])
    rebuilt = {("docker.io", "bookworm"): ["20.10.24+dfsg1-1+deb12u2"], ("docker.io", "trixie"): ["26.1.5"]}
    version, notes = install._choose_version(rebuilt, pin, "A")
    assert version == "20.10.24+dfsg1-1+deb12u2" and "gone from the archive" in notes[0]
    with pytest.raises(install.InstallError, match="not in A bookworm"):
        install._choose_version({("docker.io", "bookworm"): ["20.10.25+dfsg1-1"]}, pin, "A")


@pytest.mark.parametrize("text, release", [
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n', "12"),
    ('ID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n', "13"),
    ('ID=debian\nVERSION_CODENAME=trixie\n', "13"),  # testing images carry no VERSION_ID
])
def test_host_release_of_debian_12_and_13(tmp_path, text, release):
    (tmp_path / "os-release").write_text(text)
    assert install.host_release(str(tmp_path / "os-release")) == release


@pytest.mark.parametrize("text, message", [
    ('ID=ubuntu\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04"\n', "Ubuntu 24.04"),
    ('ID=debian\nVERSION_ID="11"\n', "Debian 11 is not supported"),
])
def test_other_hosts_are_refused_with_a_reason(tmp_path, text, message):
    (tmp_path / "os-release").write_text(text)
    with pytest.raises(install.InstallError, match=message):
        install.host_release(str(tmp_path / "os-release"))


def test_a_missing_peer_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SESSION_PEERS_PREFIX", str(tmp_path))
    reason = peers.missing_reason("dockerd-26.1")
    assert str(tmp_path / "26.1") in reason and "python3 -m conformance.peers install" in reason
    assert peers.binary("docker-cli-26.1") == str(tmp_path / "26.1" / "usr/bin/docker")
    with pytest.raises(KeyError, match="known: dockerd-20.10"):
        peers.program("dockerd-99")


def test_client_env_links_the_plugins_into_the_callers_config_dir(tmp_path):
    env = peers.client_env("docker-cli-26.1", str(tmp_path / "cfg"))
    link = tmp_path / "cfg" / "cli-plugins" / "docker-buildx"
    assert env["DOCKER_CONFIG"] == str(tmp_path / "cfg")
    assert os.readlink(link) == str(peers.vintage_dir("26.1") / "usr/libexec/docker/cli-plugins/docker-buildx")
    peers.client_env("docker-cli-26.1", str(tmp_path / "cfg"))  # idempotent
    assert not (tmp_path / "cfg2").exists()
    peers.client_env("docker-cli-20.10", str(tmp_path / "cfg2"))
    assert list((tmp_path / "cfg2").iterdir()) == [], "the CLI 20.10 needs no plugin"


# -- installed peers ---------------------------------------------------------------------------------

def _require(*names):
    realpeers.require_docker(*names)


def test_list_reports_every_peer_with_its_own_version():
    _require(*catalogue.PROGRAMS)
    proc = subprocess.run([sys.executable, "-m", "conformance.peers", "list", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert set(rows) == set(catalogue.PROGRAMS)
    assert rows["dockerd-20.10"]["version"].startswith("Docker version 20.10.24")
    assert rows["dockerd-26.1"]["version"].startswith("Docker version 26.1.5")
    assert rows["docker-cli-26.1"]["version"].endswith("buildx 0.13.1+ds1")
    assert rows["docker-cli-20.10"]["client_under_test"].endswith("/20.10/usr/bin/docker build --progress plain {context}")
    for row in rows.values():
        manifest = install.read_manifest(peers.vintage_dir(row["vintage"]))
        assert {p["name"] for p in manifest["packages"]} == {p.name for p in catalogue.VINTAGES[row["vintage"]].packages}
        assert all(len(p["sha256"]) == 64 for p in manifest["packages"])


def test_install_again_is_a_no_op_without_network():
    _require(*catalogue.PROGRAMS)
    results = install.install(log=lambda message: None)
    assert [r.action for r in results] == ["already installed"] * len(catalogue.VINTAGES)


@pytest.mark.parametrize("name, api", [("dockerd-20.10", "1.41"), ("dockerd-26.1", "1.45")])
def test_start_prints_docker_host_and_sigterm_removes_everything(name, api):
    _require(name)
    proc = subprocess.Popen([sys.executable, "-m", "conformance.peers", "start", name], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("DOCKER_HOST=unix:///tmp/dsc-"), (line, proc.stderr.read() if proc.poll() else "")
        socket_path = line.removeprefix("DOCKER_HOST=unix://")
        status, headers, _ = realpeers.unix_http_get(socket_path, "/_ping")
        assert status == 200 and headers["Api-Version"] == api
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
    directory = os.path.dirname(socket_path)
    assert not os.path.exists(directory)
    traces = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if directory in line]
    assert traces == []


def test_start_refuses_a_client_peer():
    proc = subprocess.run([sys.executable, "-m", "conformance.peers", "start", "docker-cli-26.1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a daemon peer" in proc.stderr


@pytest.fixture(scope="module")
def dockerd_26():
    _require("dockerd-26.1")
    with realpeers.PrivateDockerd("dockerd-26.1") as daemon:
        yield daemon


@pytest.mark.parametrize("cli_peer", ["docker-cli-20.10", "docker-cli-26.1"])
def test_each_cli_builds_and_exports_on_dockerd_26(dockerd_26, cli_peer, tmp_path):
    _require(cli_peer)
    context = tmp_path / "ctx"
    (context / "sub").mkdir(parents=True)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    (context / "sub" / "f.txt").write_text("26.1\n")
    result = dockerd_26.cli("build", "--progress", "plain", "-o", f"type=local,dest={tmp_path / 'out'}",
                            str(context), client=cli_peer)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "sub" / "f.txt").read_text() == "26.1\n"
    if cli_peer == "docker-cli-26.1":
        # buildx, not the CLI's own builder: it names its builder instance and the docker driver.
        assert 'building with "default" instance using docker driver' in result.stderr


def test_versions_reported_by_dockerd_26(dockerd_26):
    status, _, body = realpeers.unix_http_get(dockerd_26.socket_path, "/version")
    info = json.loads(body)
    assert status == 200 and info["Version"].startswith("26.1.5") and info["ApiVersion"] == "1.45"
    components = {c["Name"]: c["Version"] for c in info["Components"]}
    assert components["containerd"].startswith("1.7.24") and components["runc"].startswith("1.1.5")


# -- the machine's apt sources (no network) -----------------------------------------------------------

def _etc_apt(tmp_path, sources_list="", parts=()):
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    (root / "sources.list").write_text(sources_list)
    for name, text in parts:
        (root / "sources.list.d" / name).write_text(text)
    return str(root)


def test_a_debian_13_deb822_source_is_found_with_its_keyring(tmp_path):
    deb822 = (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: trixie trixie-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: trixie-security\nComponents: main\n\n"
        "Types: deb\nEnabled: No\nURIs: http://disabled.example/debian\nSuites: trixie\nComponents: main\n"
    )
    source = install.archive_source(_etc_apt(tmp_path, parts=[("debian.sources", deb822)]))
    assert source.uri == "http://mirror.example/debian"
    assert source.keyrings == ("/usr/share/keyrings/debian-archive-keyring.pgp",)


def test_one_line_options_and_suite_aliases(tmp_path, monkeypatch):
    monkeypatch.delenv("SESSION_PEERS_ARCHIVE", raising=False)
    one_line = ("deb [arch=amd64 signed-by=/etc/apt/keyrings/m.gpg] http://alias.example/debian stable main\n"
                "deb http://codename.example/debian bookworm main contrib\n")
    source = install.archive_source(_etc_apt(tmp_path, one_line))
    assert source.uri == "http://codename.example/debian", "a codename wins over an alias"
    only_alias = install.archive_source(_etc_apt(tmp_path / "b", one_line.splitlines()[0] + "\n"))
    assert (only_alias.uri, only_alias.keyrings) == ("http://alias.example/debian", ("/etc/apt/keyrings/m.gpg",))


def test_without_a_usable_entry_the_default_archive_or_the_override(tmp_path, monkeypatch):
    security_only = "deb http://security.debian.org/debian-security bookworm-security main\n"
    monkeypatch.delenv("SESSION_PEERS_ARCHIVE", raising=False)
    assert install.archive_source(_etc_apt(tmp_path, security_only)).uri == "http://deb.debian.org/debian"
    monkeypatch.setenv("SESSION_PEERS_ARCHIVE", "http://override.example/debian/")
    assert install.archive_source(_etc_apt(tmp_path / "b", security_only)).uri == "http://override.example/debian"


def test_private_sources_name_both_suites_packages_only(tmp_path):
    text = install.private_sources("http://a/debian", ["/k.pgp"], "amd64")
    assert text == ("deb [signed-by=/k.pgp arch=amd64 target=Packages] http://a/debian bookworm main\n"
                    "deb [signed-by=/k.pgp arch=amd64 target=Packages] http://a/debian trixie main\n")
    assert "signed-by" not in install.private_sources("http://a/debian", [], "arm64")
