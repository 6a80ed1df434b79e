"""Unit tests of the test host's vDPA parents: tools/testbed's vdpa-parents step
(version pinning, vermagic check, the modules' cpio), the qemu-storage-daemon
peer (tools/testbed_peers.py) and the harness functions that load the parents
(tools/testbed-host/harness.sh, run under busybox sh with stand-ins for insmod,
rmmod and vdpa-mgmt)."""

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import tempfile
import unittest

TOOLS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_testbed():
    loader = importlib.machinery.SourceFileLoader("testbed_script", os.path.join(TOOLS, "testbed"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


testbed = _load_testbed()
import testbed_peers  # noqa: E402  (tools/ is on sys.path once testbed is loaded)


def read_newc(data):
    """[(name, mode, bytes)] of a newc cpio archive, up to its trailer."""
    out, off = [], 0
    while True:
        hdr = data[off:off + 110]
        assert hdr[:6] == b"070701", hdr[:6]
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += (4 - off % 4) % 4
        body = data[off:off + size]
        off += size
        off += (4 - off % 4) % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body))


class VersionPinningTest(unittest.TestCase):
    def test_the_abi_and_upstream_version_come_from_the_release(self):
        self.assertEqual(testbed.kernel_abi("6.12.118+deb12-amd64"), ("6.12.118+deb12", "6.12.118"))
        for bad in ("6.1.0-28-amd64", "6.12.118+deb12-cloud-amd64", "6.12.118+deb12-amd64x"):
            with self.assertRaises(testbed.Failure):
                testbed.kernel_abi(bad)

    def test_upstream_version_drops_epoch_and_revision(self):
        self.assertEqual(testbed.upstream_version("6.12.118-1~deb12u1"), "6.12.118")
        self.assertEqual(testbed.upstream_version("1:7.2+dfsg-7+deb12u18+b3"), "7.2+dfsg")
        self.assertEqual(testbed.upstream_version("6.12.118"), "6.12.118")

    def test_a_source_of_the_same_6_12_n_is_accepted(self):
        testbed.check_source_matches("linux-image-6.12.118+deb12-amd64-unsigned",
                                     "6.12.118-1~deb12u1", "6.12.118-1~deb12u1")

    def test_another_6_12_n_is_refused_naming_both_versions(self):
        with self.assertRaises(testbed.Failure) as cm:
            testbed.check_source_matches("linux-image-6.12.118+deb12-amd64-unsigned",
                                         "6.12.118-1~deb12u1", "6.12.117-1~deb12u1")
        msg = str(cm.exception)
        self.assertIn("6.12.118-1~deb12u1", msg)
        self.assertIn("6.12.117-1~deb12u1", msg)
        self.assertIn("linux-source-6.12", msg)

    def test_vermagic_must_name_the_host_release_and_modversions(self):
        rel = "6.12.118+deb12-amd64"
        self.assertTrue(testbed.vermagic_ok(rel + " SMP preempt mod_unload modversions", rel))
        self.assertFalse(testbed.vermagic_ok("6.12.117+deb12-amd64 SMP preempt mod_unload modversions", rel))
        self.assertFalse(testbed.vermagic_ok(rel + " SMP preempt mod_unload", rel))
        self.assertFalse(testbed.vermagic_ok(rel + "-x SMP preempt mod_unload modversions", rel))


class ParentsRecipeTest(unittest.TestCase):
    def test_the_kbuild_builds_the_four_modules_in_load_order(self):
        self.assertEqual(testbed.VDPA_PARENT_MODULES, ["vringh", "vdpa_sim", "vdpa_sim_net", "vdpa_sim_blk"])
        self.assertEqual(testbed.VDPA_PARENTS_KBUILD,
                         "obj-m := vringh.o vdpa_sim.o vdpa_sim_net.o vdpa_sim_blk.o\n")
        # Every module's source is copied, from the kernel tree's own place.
        for m in testbed.VDPA_PARENT_MODULES:
            self.assertIn(m + ".c", testbed.VDPA_PARENT_SOURCES)
        self.assertEqual(testbed.VDPA_PARENT_SOURCES["vringh.c"], "drivers/vhost/vringh.c")
        self.assertEqual(testbed.VDPA_PARENT_SOURCES["vdpa_sim.h"], "drivers/vdpa/vdpa_sim/vdpa_sim.h")

    def test_the_simulators_are_not_loaded_at_boot(self):
        # The boot-time list is the shipped modules only; the harness loads the rest.
        for m in testbed.VDPA_PARENT_MODULES:
            self.assertNotIn(m, testbed.HOST_MODULES)

    def test_cpio_entries_land_where_the_harness_looks(self):
        c = testbed.Cpio()
        c.file(testbed.VDPA_PARENTS_IN_HOST + "/vringh.ko", b"\x7fELF-x")
        c.file(testbed.VDPA_PARENTS_IN_HOST + "/order", b"vringh.ko\n")
        entries = read_newc(c.bytes())
        names = [n for n, _, _ in entries]
        self.assertEqual(names, ["lib", "lib/modules", "lib/modules/microvm", "lib/modules/microvm/extra",
                                 "lib/modules/microvm/extra/vringh.ko", "lib/modules/microvm/extra/order"])
        self.assertEqual(entries[4][2], b"\x7fELF-x")
        with open(os.path.join(TOOLS, "testbed-host", "harness.sh")) as f:
            self.assertIn("${MICROVM_VDPA_PARENTS_DIR:-%s}" % testbed.VDPA_PARENTS_IN_HOST, f.read())


class FakeApt:
    def __init__(self, rows):
        self.rows = rows

    def madison(self, pkg):
        return self.rows.get(pkg, [])


class QsdPeerTest(unittest.TestCase):
    def test_the_newest_bookworm_qemu_system_common_is_chosen(self):
        apt = FakeApt({"qemu-system-common": [("1:10.0.2+ds-1~bpo12+1", "bookworm-backports"),
                                              ("1:7.2+dfsg-7+deb12u18+b3", "bookworm"),
                                              ("1:7.2+dfsg-7+deb12u10", "bookworm")]})
        self.assertEqual(testbed_peers.choose_qsd_version(apt), ("1:7.2+dfsg-7+deb12u18+b3", "bookworm"))

    def test_no_bookworm_package_is_an_error(self):
        apt = FakeApt({"qemu-system-common": [("1:10.0.2+ds-1~bpo12+1", "bookworm-backports")]})
        with self.assertRaises(testbed_peers.PeerError):
            testbed_peers.choose_qsd_version(apt)

    def test_the_wrapper_runs_the_carried_loader_and_libraries(self):
        w = testbed_peers.qsd_wrapper()
        self.assertTrue(w.startswith("#!/bin/sh\n"))
        self.assertIn("exec /opt/peers/qsd/lib/ld-linux-x86-64.so.2 --library-path /opt/peers/qsd/lib "
                      "/opt/peers/qsd/bin/qemu-storage-daemon \"$@\"", w)
        self.assertEqual(testbed_peers.QSD_IN_HOST, "/opt/peers/qsd")


BUSYBOX = shutil.which("busybox")


@unittest.skipUnless(BUSYBOX, "busybox not installed")
class HarnessParentsTest(unittest.TestCase):
    """h_parent_load and friends against a fake /sys/module and stand-ins that
    log what they were asked to do."""

    STUBS = r'''
h_diag() { echo "(diag)" >&2; }
insmod() {
	echo "insmod ${1##*/} ${2:-} ${3:-}" >>"$T/calls"
	m=${1##*/}; m=${m%.ko}
	mkdir -p "$H_SYS_MODULE/$m/parameters"
	if [ "$m" = vdpa_sim ]; then
		echo "${2#*=}" >"$H_SYS_MODULE/vdpa_sim/parameters/batch_mapping"
		if [ "${3#*=}" = 1 ]; then v=Y; else v=N; fi
		echo $v >"$H_SYS_MODULE/vdpa_sim/parameters/use_va"
	fi
	[ "$m" = vdpa_sim_net ] && echo vdpasim_net >>"$T/mgmtdevs"
	[ "$m" = vdpa_sim_blk ] && echo vdpasim_blk >>"$T/mgmtdevs"
	return 0
}
rmmod() {
	echo "rmmod $1" >>"$T/calls"
	rm -rf "${H_SYS_MODULE:?}/$1"
}
'''
    # vdpa-mgmt is not a valid sh function name: a script on PATH stands in.
    VDPA_MGMT = r'''#!/bin/sh
case "$1 $2" in
"mgmtdev list") cat "$T/mgmtdevs" 2>/dev/null ;;
"dev add") echo "dev add $*" >>"$T/calls" ;;
"dev node") echo /dev/vhost-vdpa-7 ;;
"dev del") echo "dev del $3" >>"$T/calls" ;;
*) exit 2 ;;
esac
'''

    def run_sh(self, script):
        t = tempfile.mkdtemp(prefix="harness-parents-")
        self.addCleanup(shutil.rmtree, t, True)
        os.makedirs(os.path.join(t, "extra"))
        for m in testbed.VDPA_PARENT_MODULES:
            open(os.path.join(t, "extra", m + ".ko"), "wb").close()
        os.makedirs(os.path.join(t, "bin"))
        stub = os.path.join(t, "bin", "vdpa-mgmt")
        with open(stub, "w") as f:
            f.write(self.VDPA_MGMT)
        os.chmod(stub, 0o755)
        env = dict(os.environ, T=t, H_DIR=os.path.join(t, "h"), H_SYS_MODULE=os.path.join(t, "sys"),
                   MICROVM_VDPA_PARENTS_DIR=os.path.join(t, "extra"),
                   PATH=os.path.join(t, "bin") + os.pathsep + os.environ.get("PATH", ""))
        full = ". %s\n%s\n%s\n" % (os.path.join(TOOLS, "testbed-host", "harness.sh"), self.STUBS, script)
        r = subprocess.run([BUSYBOX, "sh", "-c", full], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        calls = ""
        if os.path.exists(os.path.join(t, "calls")):
            with open(os.path.join(t, "calls")) as f:
                calls = f.read()
        return r, calls

    def test_load_inserts_vringh_vdpa_sim_with_its_parameters_then_the_parent(self):
        r, calls = self.run_sh("h_parent_load vdpa_sim_net batch_mapping=0 use_va=0 && echo loaded")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("loaded", r.stdout)
        self.assertEqual(calls.split("\n")[:3], ["insmod vringh.ko  ", "insmod vdpa_sim.ko batch_mapping=0 use_va=0",
                                                 "insmod vdpa_sim_net.ko  "])

    def test_other_parameters_reload_vdpa_sim_and_same_ones_do_not(self):
        r, calls = self.run_sh("h_parent_load vdpa_sim_net && h_parent_load vdpa_sim_net && "
                               "h_parent_load vdpa_sim_net batch_mapping=0 && echo loaded")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = [l for l in calls.split("\n") if l]
        self.assertEqual(lines, ["insmod vringh.ko  ", "insmod vdpa_sim.ko batch_mapping=1 use_va=1",
                                 "insmod vdpa_sim_net.ko  ",
                                 "rmmod vdpa_sim_net", "rmmod vdpa_sim", "rmmod vringh",
                                 "insmod vringh.ko  ", "insmod vdpa_sim.ko batch_mapping=0 use_va=1",
                                 "insmod vdpa_sim_net.ko  "])
        self.assertIn("reloading with batch_mapping=0 use_va=1", r.stderr)

    def test_devices_are_recorded_and_deleted_before_unloading(self):
        r, calls = self.run_sh("h_parent_load vdpa_sim_blk && n=$(h_vdpa_add vdpasim_blk blk0) && echo \"node=$n\" "
                               "&& cat \"$H_DIR/vdpa.blk0\" && h_parent_unload && echo unloaded")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("node=/dev/vhost-vdpa-7", r.stdout)
        self.assertIn("vdpasim_blk /dev/vhost-vdpa-7", r.stdout)
        lines = [l for l in calls.split("\n") if l]
        self.assertEqual(lines[-4:], ["dev del blk0", "rmmod vdpa_sim_blk", "rmmod vdpa_sim", "rmmod vringh"])

    def test_a_missing_management_device_fails_within_the_bound_naming_it(self):
        r, _ = self.run_sh("h_mgmtdev_present() { return 1; }\n"
                           "H_PARENT_WAIT_S=1 h_parent_load vdpa_sim_net; echo \"st=$?\"")
        self.assertIn("st=1", r.stdout)
        self.assertIn("management device vdpasim_net of vdpa_sim_net to appear (not within 1s)", r.stderr)

    def test_bad_arguments_are_refused_before_anything_runs(self):
        r, calls = self.run_sh("h_parent_load vdpa_sim_foo; h_parent_load vdpa_sim_net use_va=yes; "
                               "h_qsd_start d0 /nonexistent; h_qsd_start 'a,b' /etc/hostname; echo done")
        self.assertEqual(calls, "")
        self.assertIn("unknown parent 'vdpa_sim_foo'", r.stderr)
        self.assertIn("bad parameter 'use_va=yes'", r.stderr)
        self.assertIn("image '/nonexistent' is not a file", r.stderr)
        self.assertIn("may not contain ','", r.stderr)

    def test_a_command_that_hangs_is_failed_at_its_bound(self):
        r, _ = self.run_sh("h_bounded 1 'rmmod of a busy module' sleep 5; echo \"st=$?\"")
        self.assertIn("st=1", r.stdout)
        self.assertIn("rmmod of a busy module (still running after 1s", r.stderr)


if __name__ == "__main__":
    unittest.main()
