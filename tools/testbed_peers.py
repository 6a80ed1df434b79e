"""QEMU peers for the comparison, carried into the test host by tools/testbed.

Each peer is a QEMU release from a Debian suite, fetched with `apt-get download`
through a sources list of its own (this machine's packages are never upgraded:
see ../shared/TESTBED.md section 6), extracted, and packed with the shared
libraries its binary needs (ldd), its modules and the firmware it loads into a
cpio archive that tools/testbed appends to the test host's initramfs. Inside
the test host the peer is `/opt/peers/NAME/qemu`, a wrapper that starts
`ld-linux-x86-64.so.2 --library-path DIR/lib DIR/bin/qemu-system-x86_64 -L
DIR/firmware`, so the test host needs no glibc of its own.

Results are cached by the package versions and this recipe, like every asset.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

RECIPE = 1
PEERS_IN_HOST = "/opt/peers"
ARCHIVE = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Suites a peer may take each package from, preferred first. QEMU 10 from
# backports is built for bookworm: its libraries are bookworm's.
PEERS = {
    "qemu10": {"label": "QEMU 10.0", "suites": ["bookworm-backports", "bookworm"],
               "qemu_suite": "bookworm-backports"},
    "qemu72": {"label": "QEMU 7.2", "suites": ["bookworm"], "qemu_suite": "bookworm"},
}
PACKAGES = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"]
# What QEMU loads from -L for the machine types used here (microvm, pc, q35).
FIRMWARE = ["bios-microvm.bin", "qboot.rom", "linuxboot_dma.bin", "linuxboot.bin", "pvh.bin",
            "bios.bin", "bios-256k.bin", "kvmvapic.bin", "multiboot_dma.bin", "multiboot.bin",
            "vgabios-stdvga.bin"]


class PeerError(Exception):
    pass


def _sha(*parts):
    h = hashlib.sha256()
    for p in parts:
        p = p.encode() if isinstance(p, str) else p
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:20]


class Apt:
    """apt-get with its own sources list, lists and package cache under `root`."""

    def __init__(self, root, log):
        self.root = root
        self.log = log
        self.sources = os.path.join(root, "sources.list")
        self.lists = os.path.join(root, "lists")
        self.cache = os.path.join(root, "cache")
        os.makedirs(os.path.join(self.lists, "partial"), exist_ok=True)
        os.makedirs(os.path.join(self.cache, "archives", "partial"), exist_ok=True)
        text = "".join("deb [signed-by=%s] %s %s main\n" % (KEYRING, url, suite) for url, suite in (
            (ARCHIVE, "bookworm"), (ARCHIVE, "bookworm-updates"), (ARCHIVE, "bookworm-backports"),
            (SECURITY, "bookworm-security")))
        with open(self.sources, "w") as f:
            f.write(text)

    def opts(self):
        return ["-o", "Dir::Etc::sourcelist=" + self.sources, "-o", "Dir::Etc::sourceparts=/dev/null",
                "-o", "Dir::State::Lists=" + self.lists, "-o", "Dir::Cache=" + self.cache]

    def update(self):
        self.log("apt-get update (peer sources list in %s)" % self.root)
        r = subprocess.run(["apt-get"] + self.opts() + ["update"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise PeerError("apt-get update with the peer sources list failed:\n" + r.stdout[-2000:])

    def have_lists(self):
        return bool(glob.glob(os.path.join(self.lists, "*bookworm-backports*Packages*")))

    def madison(self, pkg):
        """[(version, suite)] from apt-cache madison."""
        r = subprocess.run(["apt-cache"] + self.opts() + ["madison", pkg], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        rows = []
        for line in r.stdout.splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) == 3 and cols[0] == pkg and "Packages" in cols[2]:
                suite = cols[2].split()[1].split("/")[0]
                rows.append((cols[1], suite))
        return rows

    def download(self, specs, dest):
        r = subprocess.run(["apt-get"] + self.opts() + ["download"] + specs, cwd=dest,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return r.returncode == 0, r.stdout


def choose_versions(apt, peer):
    """{package: (version, suite)}: the newest version in the first suite that has it."""
    spec = PEERS[peer]
    chosen = {}
    for pkg in PACKAGES:
        rows = apt.madison(pkg)
        suites = [spec["qemu_suite"]] if pkg.startswith("qemu-") else spec["suites"]
        for suite in suites:
            versions = [v for v, s in rows if s == suite]
            if versions:
                # madison lists newest first.
                chosen[pkg] = (versions[0], suite)
                break
        if pkg not in chosen:
            raise PeerError("no %s in %s for %s" % (pkg, "/".join(suites), peer))
    return chosen


def _libraries(binary):
    """Absolute paths of the shared libraries `binary` needs, and the dynamic loader."""
    r = subprocess.run(["ldd", binary], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise PeerError("ldd %s failed: %s" % (binary, r.stdout.strip()))
    libs, missing, loader = [], [], None
    for line in r.stdout.splitlines():
        line = line.strip()
        m = re.match(r"(\S+) => not found", line)
        if m:
            missing.append(m.group(1))
            continue
        m = re.match(r"(\S+) => (/\S+) \(0x", line)
        if m:
            libs.append((m.group(1), m.group(2)))
            continue
        m = re.match(r"(/\S*ld-linux[^ ]*) \(0x", line)
        if m:
            loader = m.group(1)
    if missing:
        raise PeerError("libraries of %s not found on this machine: %s (install the bookworm "
                        "packages that ship them)" % (binary, " ".join(missing)))
    if not loader:
        raise PeerError("ldd %s names no dynamic loader" % binary)
    return libs, loader


def _download_and_extract(apt, specs, tmp):
    """Downloads the packages `specs` (pkg=version) into `tmp` and unpacks
    them all into tmp/root, which it returns."""
    ok, text = apt.download(specs, tmp)
    if not ok:
        # Stale lists name versions the archive no longer serves.
        apt.update()
        ok, text = apt.download(specs, tmp)
        if not ok:
            raise PeerError("apt-get download failed:\n" + text[-2000:])
    root = os.path.join(tmp, "root")
    for deb in sorted(glob.glob(os.path.join(tmp, "*.deb"))):
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root


def _pack_binary(c, base, name, binary, libs, loader):
    """Puts `binary` at base/bin/NAME in cpio `c`, with its libraries and
    the dynamic loader under base/lib (what the wrappers start)."""
    with open(binary, "rb") as f:
        c.file(base + "/bin/" + name, f.read(), 0o755)
    for soname, path in libs:
        with open(path, "rb") as f:
            c.file(base + "/lib/" + soname, f.read(), 0o755)
    with open(loader, "rb") as f:
        c.file(base + "/lib/ld-linux-x86-64.so.2", f.read(), 0o755)


def _wrapper(peer):
    d = PEERS_IN_HOST + "/" + peer
    return ("#!/bin/sh\n"
            "# %s as carried into the test host by tools/testbed (see tools/testbed_peers.py).\n"
            "export QEMU_MODULE_DIR=%s/modules\n"
            "exec %s/lib/ld-linux-x86-64.so.2 --library-path %s/lib %s/bin/qemu-system-x86_64 "
            "-L %s/firmware \"$@\"\n" % (PEERS[peer]["label"], d, d, d, d, d))


def fetch(peer, cache, log, cpio_class):
    """Builds (or finds cached) the peer's cpio; returns its info dict."""
    if peer not in PEERS:
        raise PeerError("unknown peer %r (known: %s)" % (peer, ", ".join(sorted(PEERS))))
    apt = Apt(os.path.join(cache, "apt-peers"), log)
    if not apt.have_lists():
        apt.update()
    versions = choose_versions(apt, peer)
    key = _sha("peer", peer, json.dumps(versions, sort_keys=True), str(RECIPE))
    dest = os.path.join(cache, "peer-" + peer, key)
    info_path = os.path.join(dest, "info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        log("[peer-%s] cached (%s)" % (peer, info["version"]))
        return info
    log("[peer-%s] downloading %s" % (peer, ", ".join("%s=%s" % (p, v) for p, (v, _) in
                                                     sorted(versions.items()))))
    os.makedirs(os.path.join(cache, "tmp"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(cache, "tmp")) as tmp:
        specs = ["%s=%s" % (p, v) for p, (v, _) in sorted(versions.items())]
        root = _download_and_extract(apt, specs, tmp)
        binary = os.path.join(root, "usr", "bin", "qemu-system-x86_64")
        if not os.path.isfile(binary):
            raise PeerError("qemu-system-x86_64 not in the downloaded packages")
        libs, loader = _libraries(binary)
        version = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, text=True,
                                 check=True).stdout.splitlines()[0].strip()
        c = cpio_class()
        base = PEERS_IN_HOST + "/" + peer
        _pack_binary(c, base, "qemu-system-x86_64", binary, libs, loader)
        modules = sorted(glob.glob(os.path.join(root, "usr", "lib", "x86_64-linux-gnu", "qemu", "*.so")))
        c.dir(base + "/modules")
        for mod in modules:
            with open(mod, "rb") as f:
                c.file(base + "/modules/" + os.path.basename(mod), f.read())
        firmware = []
        for name in FIRMWARE:
            found = [p for p in (os.path.join(root, "usr", "share", "qemu", name),
                                 os.path.join(root, "usr", "share", "seabios", name))
                     if os.path.isfile(p)]
            if not found:
                raise PeerError("firmware %s not found in the downloaded packages" % name)
            with open(os.path.realpath(found[0]), "rb") as f:
                c.file(base + "/firmware/" + name, f.read())
            firmware.append(name)
        c.file(base + "/qemu", _wrapper(peer).encode(), 0o755)
        c.file(base + "/version", (version + "\n").encode())
        stage = dest + ".tmp"
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        data = c.bytes()
        with open(os.path.join(stage, "peer.cpio"), "wb") as f:
            f.write(data)
        info = {"peer": peer, "label": PEERS[peer]["label"], "version": version, "key": key,
                "packages": {p: {"version": v, "suite": s} for p, (v, s) in versions.items()},
                "libraries": [soname for soname, _ in libs], "modules": [os.path.basename(m) for m in modules],
                "firmware": firmware, "wrapper": base + "/qemu",
                "cpio": os.path.join(dest, "peer.cpio")}
        with open(os.path.join(stage, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(stage, dest)
    log("[peer-%s] done: %s, %d libraries, %d MiB" % (peer, version, len(libs), len(data) >> 20))
    return info


# ---------------------------------------------------------------- qemu-storage-daemon

# A third-party VDUSE block device (its vduse-blk export) for the tests: the
# storage daemon of bookworm's QEMU 7.2, from the package the qemu72 peer uses.
QSD = {"label": "qemu-storage-daemon 7.2", "package": "qemu-system-common", "suite": "bookworm",
       "binary": "qemu-storage-daemon"}
QSD_IN_HOST = PEERS_IN_HOST + "/qsd"


def qsd_wrapper():
    d = QSD_IN_HOST
    return ("#!/bin/sh\n"
            "# %s as carried into the test host by tools/testbed (see tools/testbed_peers.py).\n"
            "exec %s/lib/ld-linux-x86-64.so.2 --library-path %s/lib %s/bin/qemu-storage-daemon \"$@\"\n"
            % (QSD["label"], d, d, d))


def choose_qsd_version(apt):
    """(version, suite): the newest qemu-system-common in bookworm."""
    versions = [v for v, s in apt.madison(QSD["package"]) if s == QSD["suite"]]
    if not versions:
        raise PeerError("no %s in %s for qemu-storage-daemon" % (QSD["package"], QSD["suite"]))
    return versions[0], QSD["suite"]


def fetch_qsd(cache, log, cpio_class):
    """Builds (or finds cached) the qemu-storage-daemon cpio; returns its info dict.
    Inside the test host it is QSD_IN_HOST/qemu-storage-daemon (a wrapper like the
    QEMU peers'), its version line in QSD_IN_HOST/version."""
    apt = Apt(os.path.join(cache, "apt-peers"), log)
    if not apt.have_lists():
        apt.update()
    version, suite = choose_qsd_version(apt)
    key = _sha("qsd", version, suite, qsd_wrapper(), str(RECIPE))
    dest = os.path.join(cache, "peer-qsd", key)
    info_path = os.path.join(dest, "info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        log("[peer-qsd] cached (%s)" % info["version"])
        return info
    log("[peer-qsd] downloading %s=%s" % (QSD["package"], version))
    os.makedirs(os.path.join(cache, "tmp"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(cache, "tmp")) as tmp:
        root = _download_and_extract(apt, ["%s=%s" % (QSD["package"], version)], tmp)
        binary = os.path.join(root, "usr", "bin", QSD["binary"])
        if not os.path.isfile(binary):
            raise PeerError("%s not in %s=%s" % (QSD["binary"], QSD["package"], version))
        libs, loader = _libraries(binary)
        vline = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, text=True,
                               check=True).stdout.splitlines()[0].strip()
        c = cpio_class()
        _pack_binary(c, QSD_IN_HOST, "qemu-storage-daemon", binary, libs, loader)
        c.file(QSD_IN_HOST + "/qemu-storage-daemon", qsd_wrapper().encode(), 0o755)
        c.file(QSD_IN_HOST + "/version", (vline + "\n").encode())
        stage = dest + ".tmp"
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        data = c.bytes()
        with open(os.path.join(stage, "qsd.cpio"), "wb") as f:
            f.write(data)
        info = {"peer": "qsd", "label": QSD["label"], "version": vline, "key": key,
                "packages": {QSD["package"]: {"version": version, "suite": suite}},
                "libraries": [soname for soname, _ in libs],
                "wrapper": QSD_IN_HOST + "/qemu-storage-daemon",
                "cpio": os.path.join(dest, "qsd.cpio")}
        with open(os.path.join(stage, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(stage, dest)
    log("[peer-qsd] done: %s, %d libraries, %d MiB" % (vline, len(libs), len(data) >> 20))
    return info
