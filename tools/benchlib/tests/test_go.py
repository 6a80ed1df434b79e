"""The host's "go" and the guest's wait for it: tools/testbed-host/harness.sh
h_go against resources/guest/init's wait_go, both under busybox sh on
loopback. A try of h_go that ends at its bound after the guest already read
the token is retried; that retry must not release the guest's next wait."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

TOOLS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(TOOLS)
BUSYBOX = shutil.which("busybox")


def guest_lib():
    """The GUEST_LIB text the guest's init prepends to every command."""
    with open(os.path.join(REPO, "resources", "guest", "init")) as f:
        text = f.read()
    start = text.index("GUEST_LIB='") + len("GUEST_LIB='")
    return text[start:text.index("\n'\n", start) + 1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@unittest.skipUnless(BUSYBOX, "busybox not installed")
class GoTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="harness-go-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.bin = os.path.join(self.dir, "bin")
        os.makedirs(self.bin)
        for applet in ("nc", "head", "tr", "cat", "sleep", "timeout", "rm"):
            os.symlink(BUSYBOX, os.path.join(self.bin, applet))
        # The guest's applets are busybox's, as in the guest.
        self.env = dict(os.environ, H_DIR=os.path.join(self.dir, "h"), PATH=self.bin + os.pathsep + os.environ.get("PATH", ""))
        self.port = free_port()

    def start_guest(self):
        """A guest that waits twice and says when each wait ends."""
        script = guest_lib() + (
            "rm -f /tmp/go.last\n"
            "wait_go %d; echo released-1\n"
            "wait_go %d; echo released-2\n") % (self.port, self.port)
        # wait_go keeps its last token in /tmp/go.last, as in the guest.
        script = script.replace("/tmp/go.last", os.path.join(self.dir, "go.last"))
        guest = subprocess.Popen([BUSYBOX, "sh", "-c", script], env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        def stop():
            guest.kill()
            guest.communicate()
        self.addCleanup(stop)
        return guest

    def host(self, script, timeout=60):
        full = ". %s\n%s\n" % (os.path.join(TOOLS, "testbed-host", "harness.sh"), script)
        return subprocess.run([BUSYBOX, "sh", "-c", full], env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)

    def test_a_retried_try_releases_one_wait_only(self):
        # The first try whose nc delivers the token is then reported as ended
        # at its bound (status 124), as when the guest is slow to close.
        # (A function: busybox sh runs its own applets before PATH.)
        fake = ("timeout() { shift; \"$@\"; st=$?\n"
                "  if [ $st = 0 ] && [ ! -e \"$H_DIR/first\" ]; then : >\"$H_DIR/first\"; return 124; fi\n"
                "  return $st; }\n")
        guest = self.start_guest()
        r = self.host(fake + "h_go 127.0.0.1 %d" % self.port)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "h", "first")), "no try was retried")
        time.sleep(1.0)
        # The guest's second wait must still be waiting.
        self.assertIsNone(guest.poll(), "the retry released the second wait too")
        r = self.host("h_go 127.0.0.1 %d" % self.port)
        self.assertEqual(r.returncode, 0, r.stderr)
        out, _ = guest.communicate(timeout=20)
        self.assertEqual([l for l in out.splitlines() if l.startswith(("microvm-guest: took", "released"))],
                         ["microvm-guest: took go 1", "released-1", "microvm-guest: took go 2", "released-2"])

    def test_a_guest_that_never_listens_fails_with_the_step(self):
        r = self.host("h_diag() { :; }; H_GO_TRIES=2 H_GO_TRY_S=1 h_go 127.0.0.1 %d" % self.port)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("the guest to take 'go 1' on 127.0.0.1:%d (2 tries)" % self.port, r.stderr)


if __name__ == "__main__":
    unittest.main()
