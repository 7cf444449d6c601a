"""Bring the real peers of both vintages into the peers prefix, without touching the system's packages.

    python3 -m conformance.peers install [--prefix DIR] [--vintage 20.10|26.1 ...]

Stdlib only, so it runs before the project is pip-installed. For each vintage of ``catalogue.VINTAGES``:

1. A private apt configuration under ``PREFIX/.apt`` (its own sources list naming Debian 12's and 13's main
   suites on the archive the machine's apt already uses, one-line or deb822, its own lists and cache, no
   system preferences or source parts) is refreshed with ``apt-get update``. apt checks the archive's signed
   index with the keyrings the machine's entry names plus Debian's archive keyring.
2. Each pinned package is fetched with ``apt-get download``; its SHA-256 is compared with the index entry.
3. The packages are unpacked with ``dpkg-deb -x`` into a staging directory, which replaces
   ``PREFIX/<vintage>`` in one rename; ``manifest.json`` there records what was installed.

Nothing is configured, started or registered with dpkg. A vintage whose manifest already matches the pins
is left as it is (no network needed), so a second run is a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalogue import DEFAULT_PREFIX, PREFIX_ENV, PROGRAMS, SUITES, SUPPORTED_HOSTS, VINTAGES, Package, Vintage

MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
_DEBIAN_KEYRINGS = ("/usr/share/keyrings/debian-archive-keyring.pgp", "/usr/share/keyrings/debian-archive-keyring.gpg")
_DEFAULT_ARCHIVE = "http://deb.debian.org/debian"


class InstallError(RuntimeError):
    """A peer could not be installed; the message says why and what to do."""


def prefix_dir(prefix: str | None = None) -> Path:
    return Path(prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX)


# -- the host --------------------------------------------------------------------------------------

def host_release(os_release: str = "/etc/os-release") -> str:
    """'12' or '13' for Debian bookworm or trixie; InstallError on anything else."""
    fields: dict[str, str] = {}
    try:
        for line in Path(os_release).read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value.strip().strip('"')
    except OSError as exc:
        raise InstallError(f"cannot read {os_release}: {exc}") from exc
    if fields.get("ID") != "debian":
        raise InstallError(f"the peers are Debian packages; this host is {fields.get('PRETTY_NAME', 'unknown')}")
    release = fields.get("VERSION_ID", "")
    if release not in SUPPORTED_HOSTS:
        codename = fields.get("VERSION_CODENAME", "")
        release = next((number for number, name in SUITES.items() if name == codename), release)
    if release not in SUPPORTED_HOSTS:
        raise InstallError(f"Debian {release or '?'} is not supported (Debian {' or '.join(SUPPORTED_HOSTS)})")
    return release


@dataclass(frozen=True)
class SourceEntry:
    """One ``deb`` entry of the machine's apt sources."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    keyrings: tuple[str, ...] = ()  # Signed-By keyring files (fingerprints and inline keys are left out)


def _keyring_paths(values: list[str]) -> tuple[str, ...]:
    return tuple(value for value in values if value.startswith("/"))


def _one_line_entries(text: str) -> list[SourceEntry]:
    entries = []
    for line in text.splitlines():
        match = re.match(r"\s*deb\s+(?:\[([^]]*)\]\s*)?(\S+)\s+(\S+)\s*(.*)", line.split("#", 1)[0])
        if not match:
            continue
        options, uri, suite, components = match.groups()
        keyrings: list[str] = []
        for option in (options or "").split():
            key, sep, value = option.partition("=")
            if sep and key.lower() in ("signed-by", "signed-by+"):
                keyrings += value.split(",")
        entries.append(SourceEntry(uri, (suite,), tuple(components.split()), _keyring_paths(keyrings)))
    return entries


def _deb822_entries(text: str) -> list[SourceEntry]:
    entries = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, list[str]] = {}
        for line in stanza.splitlines():
            # Continuation lines (an inline Signed-By key block among them) start with blank space.
            if line.startswith((" ", "\t", "#")):
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.split()
        enabled = [value.lower() for value in fields.get("enabled", ["yes"])]
        if "deb" not in fields.get("types", []) or enabled == ["no"]:
            continue
        for uri in fields.get("uris", []):
            entries.append(SourceEntry(uri, tuple(fields.get("suites", [])), tuple(fields.get("components", [])),
                                       _keyring_paths(fields.get("signed-by", []))))
    return entries


def source_entries(etc_apt: str = "/etc/apt") -> list[SourceEntry]:
    """Every ``deb`` entry of the machine's apt sources, in apt's order: sources.list, then the parts
    (one-line ``*.list`` and deb822 ``*.sources``, as Debian 13 installs ``debian.sources``)."""
    entries: list[SourceEntry] = []
    root = Path(etc_apt)
    parts = sorted(path for path in (root / "sources.list.d").glob("*") if path.suffix in (".list", ".sources"))
    for path in (root / "sources.list", *parts):
        try:
            text = path.read_text()
        except OSError:
            continue
        entries += _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
    return entries


# Names a Debian archive entry may give its suite instead of the codename (with -updates etc. after it).
_SUITE_ALIASES = ("oldstable", "stable", "testing", "unstable", "sid")


def archive_source(etc_apt: str = "/etc/apt") -> SourceEntry:
    """The Debian archive the machine's apt already uses (not the security archive), with its keyrings.

    An entry naming bookworm or trixie itself wins over one naming a suite alias such as ``stable``;
    without either, deb.debian.org. ``$SESSION_PEERS_ARCHIVE`` overrides (then Debian's keyring is used).
    """
    if os.environ.get("SESSION_PEERS_ARCHIVE"):
        return SourceEntry(os.environ["SESSION_PEERS_ARCHIVE"].rstrip("/"), (), ())
    codenames = set(SUITES.values())
    by_rank: dict[int, SourceEntry] = {}
    for entry in source_entries(etc_apt):
        if "main" not in entry.components or "security" in entry.uri or entry.uri.startswith("cdrom:"):
            continue
        bases = {suite.split("-", 1)[0] for suite in entry.suites if not suite.endswith("-security")}
        if codenames.intersection(entry.suites):
            rank = 0
        elif bases.intersection(codenames.union(_SUITE_ALIASES)):
            rank = 1
        else:
            continue
        by_rank.setdefault(rank, SourceEntry(entry.uri.rstrip("/"), entry.suites, entry.components, entry.keyrings))
    if by_rank:
        return by_rank[min(by_rank)]
    return SourceEntry(_DEFAULT_ARCHIVE, (), ())


def archive_keyrings(source: SourceEntry, candidates: tuple[str, ...] = _DEBIAN_KEYRINGS) -> list[str]:
    """Keyrings the private apt checks the indexes with: those the machine's own entry for the archive
    names (a mirror may sign with its own key), then Debian's (``.pgp`` since Debian 13, where ``.gpg``
    is a compatibility link), each once. Empty when none exists: apt then checks with its trusted keys."""
    chosen: list[str] = []
    seen: set[str] = set()
    debian = next((path for path in candidates if os.path.isfile(path)), None)
    for path in (*source.keyrings, *([debian] if debian else [])):
        real = os.path.realpath(path)
        if os.path.isfile(path) and real not in seen:
            seen.add(real)
            chosen.append(path)
    return chosen


# -- the private apt -------------------------------------------------------------------------------

def private_sources(archive: str, keyrings: list[str], architecture: str) -> str:
    """The private sources list: Debian 12's and 13's main suites on one archive, Packages indexes only
    (no translations, contents or AppStream data that the machine's apt.conf.d may ask for)."""
    options = [f"arch={architecture}", "target=Packages"]
    if keyrings:
        options.insert(0, f"signed-by={','.join(keyrings)}")
    return "".join(f"deb [{' '.join(options)}] {archive} {suite} main\n" for suite in sorted(set(SUITES.values())))


class PrivateApt:
    """apt-get and apt-cache with their own sources, lists and cache: the system's state is never read
    for sources or preferences, and never written."""

    def __init__(self, root: Path, archive: str, keyrings: list[str] | None = None, log=lambda message: None):
        self.root = root
        self.archive = archive
        self.keyrings = archive_keyrings(SourceEntry(archive, (), ())) if keyrings is None else keyrings
        self._log = log
        self._updated = False

    def _options(self) -> list[str]:
        etc = self.root / "etc"
        return [
            "-o", f"Dir::Etc::SourceList={etc / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={etc / 'sources.list.d'}",
            "-o", f"Dir::Etc::Preferences={etc / 'preferences'}",
            "-o", f"Dir::Etc::PreferencesParts={etc / 'preferences.d'}",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            # The download directory is root's; apt's _apt sandbox user could not write to it.
            "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Retries=3",
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None, hint: str = "") -> str:
        command = [tool, *self._options(), *args]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0:
            raise InstallError(f"{' '.join([tool, *args])} failed ({proc.returncode}):\n"
                               f"{proc.stderr.strip()[-2000:]}{hint}")
        return proc.stdout

    def update(self) -> None:
        if self._updated:
            return
        etc = self.root / "etc"
        for directory in (etc / "sources.list.d", etc / "preferences.d", self.root / "lists" / "partial",
                          self.root / "cache" / "archives" / "partial"):
            directory.mkdir(parents=True, exist_ok=True)
        architecture = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                                      check=True).stdout.strip()
        (etc / "sources.list").write_text(private_sources(self.archive, self.keyrings, architecture))
        self._log(f"peers: apt-get update of bookworm and trixie from {self.archive} "
                  f"(signatures checked with {', '.join(self.keyrings) or 'apt trusted keys'})")
        if self.keyrings:
            hint = (f"\n(sources: {etc / 'sources.list'}; SESSION_PEERS_ARCHIVE names another Debian archive, "
                    "which must carry both bookworm and trixie)")
        else:
            hint = (f"\n(neither {' nor '.join(_DEBIAN_KEYRINGS)} exists, so apt had only its own trusted keys: "
                    "install debian-archive-keyring)")
        self._run("apt-get", "update", hint=hint)
        self._updated = True

    def versions(self, packages: list[str]) -> dict[tuple[str, str], list[str]]:
        """{(package, suite): versions the archive has, newest first}, for all packages in one call."""
        found: dict[tuple[str, str], list[str]] = {}
        for line in self._run("apt-cache", "madison", *sorted(set(packages))).splitlines():
            parts = [part.strip() for part in line.split("|")]
            if len(parts) >= 3:
                # "http://deb.debian.org/debian bookworm/main amd64 Packages"
                source = parts[2].split()
                suite = source[1].split("/")[0] if len(source) >= 2 else ""
                found.setdefault((parts[0], suite), []).append(parts[1])
        return found

    def index_entries(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
        """The index stanza of each (package, version), in one call."""
        entries: dict[tuple[str, str], dict[str, str]] = {}
        text = self._run("apt-cache", "show", *[f"{name}={version}" for name, version in wanted])
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(": ")
                if sep and not line.startswith(" ") and key not in fields:
                    fields[key] = value.strip()
            if "Package" in fields and "Version" in fields:
                entries.setdefault((fields["Package"], fields["Version"]), fields)
        for name, version in wanted:
            entry = entries.get((name, version))
            if entry is None or any(key not in entry for key in ("Filename", "SHA256", "Size")):
                raise InstallError(f"the archive's index has no complete entry for {name} {version}")
        return entries

    def download(self, wanted: list[tuple[str, str]], into: Path) -> None:
        self._run("apt-get", "download", *[f"{name}={version}" for name, version in wanted], cwd=into)


# -- installing ------------------------------------------------------------------------------------

@dataclass
class InstalledPackage:
    name: str
    version: str
    pinned: str
    suite: str
    sha256: str
    size: int
    filename: str


@dataclass
class InstallResult:
    vintage: str
    directory: str
    action: str  # "installed" | "already installed"
    packages: list[InstalledPackage]
    notes: list[str]


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _manifest_matches(manifest: dict | None, vintage: Vintage, directory: Path) -> bool:
    if not manifest or manifest.get("format") != _MANIFEST_FORMAT:
        return False
    recorded = {(p["name"], p["suite"], p["pinned"]) for p in manifest.get("packages", [])}
    if recorded != {(p.name, p.suite, p.version) for p in vintage.packages}:
        return False
    programs = [program for program in PROGRAMS.values() if program.vintage == vintage.name]
    paths = [directory / program.binary for program in programs]
    paths += [directory / plugin for program in programs for plugin in program.plugins]
    return all(os.access(path, os.X_OK) for path in paths)


def _choose_version(available_by_suite: dict, package: Package, archive: str) -> tuple[str, list[str]]:
    available = available_by_suite.get((package.name, package.suite), [])
    if package.version in available:
        return package.version, []
    same_release = [v for v in available if Package(package.name, v, package.suite).upstream == package.upstream]
    if not same_release:
        raise InstallError(
            f"{package.name} {package.version} is not in {archive} {package.suite} "
            f"(it has {', '.join(available) or 'no version'}); update the pin in conformance/peers/catalogue.py")
    chosen = same_release[0]
    return chosen, [f"{package.name}: pinned {package.version} is gone from the archive; took {chosen} "
                    f"(same upstream release {package.upstream})"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_libraries(binary: Path) -> list[str]:
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    return [line.split("=>")[0].strip() for line in proc.stdout.splitlines() if "not found" in line]


def install_vintage(vintage: Vintage, prefix: Path, apt: PrivateApt, *, force: bool = False) -> InstallResult:
    directory = prefix / vintage.name
    if not force and _manifest_matches(read_manifest(directory), vintage, directory):
        manifest = read_manifest(directory)
        return InstallResult(vintage.name, str(directory), "already installed",
                             [InstalledPackage(**p) for p in manifest["packages"]], manifest.get("notes", []))
    apt.update()
    staging = prefix / f".staging-{vintage.name}-{os.getpid()}"
    downloads = prefix / f".downloads-{vintage.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(downloads, ignore_errors=True)
    staging.mkdir(parents=True)
    downloads.mkdir(parents=True)
    notes: list[str] = []
    installed: list[InstalledPackage] = []
    try:
        available = apt.versions([package.name for package in vintage.packages])
        chosen = []
        for package in vintage.packages:
            version, substitution = _choose_version(available, package, apt.archive)
            notes.extend(substitution)
            chosen.append((package, version))
        wanted = [(package.name, version) for package, version in chosen]
        entries = apt.index_entries(wanted)
        apt.download(wanted, downloads)
        for package, version in chosen:
            entry = entries[(package.name, version)]
            deb = downloads / os.path.basename(entry["Filename"])
            if not deb.exists():
                candidates = sorted(downloads.glob(f"{package.name}_*.deb"))
                if len(candidates) != 1:
                    raise InstallError(f"apt-get download left no single .deb for {package.name} in {downloads}")
                deb = candidates[0]
            digest = _sha256(deb)
            if digest != entry["SHA256"].lower():
                raise InstallError(f"{deb.name}: SHA-256 {digest} differs from the archive's index {entry['SHA256']}")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True, capture_output=True)
            installed.append(InstalledPackage(package.name, version, package.version, package.suite, digest,
                                              int(entry["Size"]), entry["Filename"]))
            deb.unlink()
        for program in (p for p in PROGRAMS.values() if p.vintage == vintage.name):
            for relative in (program.binary, *program.plugins):
                path = staging / relative
                if not os.access(path, os.X_OK):
                    raise InstallError(f"{program.name}: {relative} is not in the unpacked packages")
                missing = _missing_libraries(path)
                if missing:
                    raise InstallError(f"{program.name}: {relative} needs {', '.join(missing)}, which this host "
                                       "lacks (install the library packages: .ci/install-system-deps)")
        manifest = {"format": _MANIFEST_FORMAT, "vintage": vintage.name, "archive": apt.archive,
                    "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "packages": [asdict(p) for p in installed], "notes": notes}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        retired = prefix / f".retired-{vintage.name}-{os.getpid()}"
        if directory.exists():
            directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(downloads, ignore_errors=True)
    return InstallResult(vintage.name, str(directory), "installed", installed, notes)


@contextlib.contextmanager
def _locked(prefix: Path):
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two installs at once would race on the same directories
        yield


def install(prefix: str | None = None, vintages: list[str] | None = None, *, force: bool = False,
            log=print) -> list[InstallResult]:
    if os.geteuid() != 0:
        raise InstallError("installing the peers needs root (the prefix and the private daemons are root's)")
    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb", "ldd"):
        if shutil.which(tool) is None:
            raise InstallError(f"{tool} not found: the peers are installed with Debian's own tools")
    release = host_release()
    root = prefix_dir(prefix)
    names = vintages or list(VINTAGES)
    unknown = [name for name in names if name not in VINTAGES]
    if unknown:
        raise InstallError(f"unknown vintage {', '.join(unknown)} (known: {', '.join(VINTAGES)})")
    results = []
    with _locked(root):
        source = archive_source()
        apt = PrivateApt(root / ".apt", source.uri, archive_keyrings(source), log=log)
        for name in names:
            result = install_vintage(VINTAGES[name], root, apt, force=force)
            log(f"peers: {name} {result.action} in {result.directory} (host Debian {release}): "
                + ", ".join(f"{p.name} {p.version}" for p in result.packages))
            for note in result.notes:
                log(f"peers: note: {note}")
            results.append(result)
    return results
