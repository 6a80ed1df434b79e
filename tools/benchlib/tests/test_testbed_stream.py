"""Unit tests of tools/testbed's console reader (stream): a stand-in for
QEMU prints the test host's markers and kernel lines, and the reader must
end the run with the right exit code and say why."""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import unittest

from benchlib.tests.test_testbed_parents import testbed
import testbed_watch  # noqa: E402  (tools/ is on sys.path once testbed is loaded)

MARK = "@@testbed-test@@"


def fake_qemu(script):
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def args(timeout=60, lockup_limit=300, silence_limit=240):
    return argparse.Namespace(boot_timeout=30, timeout=timeout, lockup_limit=lockup_limit,
                              silence_limit=silence_limit, verbose=False, cmd=["true"])


class Captured:
    """stdout (as bytes, as stream writes it) and stderr of one stream() call."""

    def __init__(self):
        self.out = io.BytesIO()
        self.err = io.StringIO()

    def run(self, qemu, a, watch=None):
        class Out:
            buffer = self.out
        old = sys.stdout
        sys.stdout = Out()
        try:
            with contextlib.redirect_stderr(self.err):
                return testbed.stream(qemu, a, MARK, time.time(), watch)
        finally:
            sys.stdout = old
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()
            qemu.stdout.close()


class StreamTest(unittest.TestCase):
    def test_the_commands_exit_status_is_returned(self):
        c = Captured()
        rc = c.run(fake_qemu(f"echo '{MARK} READY=x'; echo hello; echo '{MARK} EXIT=7'; sleep 30"), args())
        self.assertEqual(rc, 7)
        self.assertIn(b"hello", c.out.getvalue())

    def test_a_soft_locked_test_host_is_killed_at_the_limit_not_at_the_timeout(self):
        lines = "".join(f"echo '[ {t}.5] watchdog: BUG: soft lockup - CPU#1 stuck for {t}s! [kworker/1:0:28]'; "
                        for t in (26, 52, 78, 304, 330))
        c = Captured()
        t0 = time.time()
        rc = c.run(fake_qemu(f"echo '{MARK} READY=x'; {lines} sleep 60"), args(timeout=600))
        self.assertEqual(rc, testbed.EXIT_LOCKED)
        self.assertLess(time.time() - t0, 20)
        err = c.err.getvalue()
        self.assertIn("CPU 1 has been soft-locked for 304s", err)
        self.assertIn("stuck for 78s", err)  # the console tail says what came before

    def test_a_short_lockup_the_host_recovers_from_is_not_fatal(self):
        c = Captured()
        rc = c.run(fake_qemu(f"echo '{MARK} READY=x'; "
                             "echo 'watchdog: BUG: soft lockup - CPU#0 stuck for 52s! [x:1]'; "
                             f"echo done; echo '{MARK} EXIT=0'"), args())
        self.assertEqual(rc, 0)

    def test_a_command_past_its_timeout_is_a_timeout(self):
        c = Captured()
        rc = c.run(fake_qemu(f"echo '{MARK} READY=x'; sleep 30"), args(timeout=1))
        self.assertEqual(rc, testbed.EXIT_TIMEOUT)
        self.assertIn("exceeded --timeout 1s", c.err.getvalue())

    def test_a_test_host_whose_heartbeat_stops_is_killed_at_the_silence_limit(self):
        with tempfile.TemporaryDirectory() as d:
            beat = os.path.join(d, "heartbeat")
            watch = testbed.Watch(testbed_watch.Heartbeat(beat), os.path.join(d, "no-monitor"), None)
            c = Captured()
            t0 = time.time()
            # Two beats, then silence while the console goes on.
            rc = c.run(fake_qemu(f"echo '{MARK} READY=x'; echo 'beat 1' >> {beat}; sleep 1; "
                                 f"echo 'beat 2' >> {beat}; echo working; sleep 60"),
                       args(timeout=600, silence_limit=3), watch)
            self.assertEqual(rc, testbed.EXIT_SILENT)
            self.assertLess(time.time() - t0, 20)
            err = c.err.getvalue()
            self.assertIn("no heartbeat from its userspace", err)
            self.assertIn("QEMU's monitor did not answer", err)
            self.assertIn("working", err)  # the console tail

    def test_a_beating_test_host_is_not_silent(self):
        with tempfile.TemporaryDirectory() as d:
            beat = os.path.join(d, "heartbeat")
            watch = testbed.Watch(testbed_watch.Heartbeat(beat), os.path.join(d, "no-monitor"), None)
            c = Captured()
            rc = c.run(fake_qemu(f"echo '{MARK} READY=x'; for i in 1 2 3 4 5 6; do echo beat >> {beat}; "
                                 f"sleep 1; done; echo '{MARK} EXIT=0'"),
                       args(timeout=600, silence_limit=3), watch)
            self.assertEqual(rc, 0)


if __name__ == "__main__":
    unittest.main()
