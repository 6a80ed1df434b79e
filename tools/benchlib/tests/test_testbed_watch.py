"""Unit tests of the test host's watchdog (tools/testbed_watch.py): the
heartbeat file, naming addresses, and asking a stand-in for QEMU's human
monitor where the CPUs are."""

import os
import socket
import tempfile
import threading
import time
import unittest

from benchlib.tests.test_testbed_parents import testbed  # noqa: F401  (puts tools/ on sys.path)
import testbed_watch  # noqa: E402

SYSTEM_MAP = """ffffffff81000000 T _text
ffffffff81ce7050 T pv_native_safe_halt
ffffffff81ce7080 t default_idle
ffffffff82000000 D some_data
ffffffff81d00000 T _etext
"""

MODULES = """modules-begin
vduse 61440 0 - Live 0xffffffffc03f8000
vhost_vdpa 32768 0 - Live 0xffffffffc03ec000
modules-end
beat 12.3
"""


class FakeMonitor:
    """Answers HMP commands like QEMU does: echo, output, prompt."""

    def __init__(self, path, answers):
        self.answers = answers
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.server.accept()
        conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = line.decode()
                out = next((v for k, v in self.answers.items() if cmd.startswith(k)), "")
                conn.sendall(cmd.encode() + b"\r\n\x1b[K" + out.encode() + b"\r\n(qemu) ")


class WatchTest(unittest.TestCase):
    def test_addresses_are_named_by_function_or_module(self):
        mods = [(0xffffffffc03f8000, 61440, "vduse")]
        sym = testbed_watch.Symbols(SYSTEM_MAP, mods)
        self.assertEqual(sym.name(0xffffffff81ce705f), "pv_native_safe_halt+0xf")
        self.assertEqual(sym.name(0xffffffff81ce7090), "default_idle+0x10")
        self.assertEqual(sym.name(0xffffffffc03f8123), "[vduse]+0x123")
        self.assertIsNone(sym.name(0x00007fff12345678))      # user space
        self.assertIsNone(sym.name(0xffffffff81d40000))      # far past the last text symbol

    def test_the_heartbeat_file_gives_the_last_module_list_and_the_silence(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "hb")
            hb = testbed_watch.Heartbeat(path)
            hb.poll(100.0)
            self.assertIsNone(hb.silent_for(200.0))          # no beat yet: not armed
            with open(path, "w") as f:
                f.write(MODULES.replace("\n", "\r\n"))
            hb.poll(101.0)
            self.assertEqual(hb.silent_for(111.0), 10.0)
            self.assertEqual([m[2] for m in hb.modules()], ["vhost_vdpa", "vduse"])
            hb.poll(120.0)                                    # nothing new
            self.assertEqual(hb.silent_for(121.0), 20.0)

    def test_the_monitor_is_asked_where_each_cpu_is(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "mon.sock")
            FakeMonitor(path, {
                "info cpus": "* CPU #0: thread_id=11\r\n  CPU #1: thread_id=12",
                "cpu ": "",
                "info registers": "RAX=0 RBX=0\r\nRIP=ffffffff81ce705f RFL=00000246",
                "info lapic": "dumping local APIC state for CPU 0\r\n\r\n"
                              "LVTT\t 0x000400ec active-hi edge                 tsc-deadline\r\n"
                              "Timer\t DCR=0x0 (divide by 2) initial_count = 0 current_count = 0\r\n"
                              "ISR\t (none)\r\nIRR\t 236",
                "x/": "ffffc90000013e80: 0xffffffff81ce7085 0x0000000000000000\r\n"
                      "ffffc90000013e90: 0xffffffffc03f8010 0x00007fff00000000",
            })
            lines = testbed_watch.dead_host_report(
                path, SYSTEM_MAP, [(0xffffffffc03f8000, 61440, "vduse")])
        text = "\n".join(lines)
        self.assertIn("CPU 0: RIP ffffffff81ce705f pv_native_safe_halt+0xf", text)
        self.assertIn("CPU 1: RIP", text)
        self.assertIn("default_idle+0x5, [vduse]+0x10", text)
        self.assertIn("CPU 0: lapic LVTT 0x000400ec active-hi edge tsc-deadline", text)
        self.assertIn("CPU 1: lapic IRR 236", text)

    def test_a_monitor_that_does_not_answer_is_said_to_be_stuck(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "mon.sock")
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
            server.listen(1)                                  # accepts, never speaks
            t0 = time.time()
            lines = testbed_watch.dead_host_report(path, SYSTEM_MAP, [])
            server.close()
        self.assertIn("QEMU itself is stuck", lines[0])
        self.assertLess(time.time() - t0, 10)


if __name__ == "__main__":
    unittest.main()
