"""Unit tests of the soak command's classification (tools/benchlib/soak.py)."""

import unittest

from benchlib import soak, vmms


class ClassifyTest(unittest.TestCase):
    def test_a_completed_vm_is_ok(self):
        self.assertEqual(soak.classify("x\n@@soak ok\n", 0), (True, None, False))

    def test_a_harness_timeout_is_a_hang_named_by_its_step(self):
        out = ("harness: FAILED: the guest to show MemTotal after the plug ('soak-memtotal' in "
               "/tmp/vm0.console) (not within 60s)\n@@soak fail MemTotal after plug\n")
        self.assertEqual(soak.classify(out, 0),
                         (False, "the guest to show MemTotal after the plug", True))

    def test_a_vmm_that_exited_early_is_a_guest_end_not_a_hang(self):
        out = "harness: FAILED: the guest to boot ('x' in /tmp/c) (the VMM exited first)\n@@soak fail boot\n"
        self.assertEqual(soak.classify(out, 0), (False, soak.GUEST_ENDED, False))

    def test_a_triple_fault_wins_over_the_step_it_broke(self):
        out = ("microvm: vCPU 0 triple-faulted; the guest is reset\n"
               "harness: FAILED: the guest to stream ('ping' in /tmp/c) (not within 9s)\n")
        self.assertEqual(soak.classify(out, 0), (False, soak.GUEST_ENDED, False))

    def test_the_test_hosts_own_panic_is_a_lost_test_host(self):
        out = ("[ 1042.1] Kernel panic - not syncing: corrupted stack end detected inside scheduler\n"
               "testbed: error: QEMU exited (status 0) while the command ran\n")
        self.assertEqual(soak.classify(out, 104), (False, soak.TESTBED_EXITS[104], False))

    def test_a_panic_is_its_own_cause(self):
        out = "Kernel panic - not syncing: x\nharness: FAILED: s ('y' in /tmp/c) (the VMM exited first)\n"
        self.assertEqual(soak.classify(out, 0)[1], "guest kernel panic")

    def test_a_testbed_timeout_without_harness_words_is_a_hang(self):
        self.assertEqual(soak.classify("booting...\n", 103),
                         (False, soak.TESTBED_EXITS[103], True))

    def test_a_soft_locked_test_host_is_lost_not_a_hang(self):
        out = "[ 604.5] watchdog: BUG: soft lockup - CPU#1 stuck for 304s! [kworker/1:0:28]\n"
        self.assertEqual(soak.classify(out, 106), (False, soak.TESTBED_EXITS[106], False))

    def test_a_lost_test_host_is_named(self):
        self.assertEqual(soak.classify("", 104)[1], soak.TESTBED_EXITS[104])

    def test_silence_is_never_ok(self):
        ok, cause, _ = soak.classify("", 0)
        self.assertFalse(ok)
        self.assertIn("no result", cause)

    def test_ok_after_a_failed_step_is_not_ok(self):
        out = "harness: FAILED: pings to be answered\n@@soak ok\n"
        self.assertFalse(soak.classify(out, 0)[0])


class IterationsTest(unittest.TestCase):
    def test_output_splits_per_iteration(self):
        out = "noise\n@@soak-iter 0\na\n@@soak ok\n@@soak-iter 1\nb\n"
        it = soak.iterations(out)
        self.assertEqual(sorted(it), [0, 1])
        self.assertIn("@@soak ok", it[0])
        self.assertEqual(it[1], "b\n")


class SharedOutcomesTest(unittest.TestCase):
    def test_a_host_lost_midway_fails_the_run_it_was_in_and_leaves_the_rest(self):
        out = "@@soak-iter 0\n@@soak ok\n@@soak-iter 1\n@@soak ok\n@@soak-iter 2\nhalf\n"
        got = soak.shared_outcomes(out, 104, 5)
        self.assertEqual([g[:2] for g in got], [(True, None), (True, None),
                                                (False, "test host reset or QEMU died")])

    def test_a_host_that_finished_accounts_for_every_run(self):
        out = "@@soak-iter 0\n@@soak ok\n@@soak-iter 1\n@@soak ok\n"
        self.assertEqual([g[0] for g in soak.shared_outcomes(out, 0, 2)], [True, True])

    def test_a_host_that_never_came_up_still_accounts_for_one_run(self):
        got = soak.shared_outcomes("qemu: boom\n", 101, 3)
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0][1], "not reached: test host did not come up")


class SummaryTest(unittest.TestCase):
    def test_counts_runs_failures_hangs_and_causes(self):
        rec = lambda ok, cause=None, hang=False: {"scenario": "demo", "vmm": "microvm", "host": "fresh",
                                                   "ok": ok, "cause": cause, "hang": hang}
        s = soak.summary([rec(True), rec(False, "a", True), rec(False, "a", True), rec(False, "b")])
        self.assertEqual(len(s), 1)
        self.assertEqual((s[0]["runs"], s[0]["ok"], s[0]["failures"], s[0]["hangs"]), (4, 1, 3, 2))
        self.assertEqual(s[0]["causes"], {"a": 2, "b": 1})


class ScriptTest(unittest.TestCase):
    def test_every_wait_in_a_vm_snippet_is_bounded(self):
        for scenario in ("boot", "net", "hotplug", "viommu"):
            script = soak.host_script(scenario, vmms.PROJECT, 2)
            for line in script.splitlines():
                self.assertNotIn("until", line, f"{scenario}: hand-written loop: {line}")
                if "nc " in line and "microvm.cmd" not in line:
                    self.fail(f"{scenario}: a bare nc: {line}")
                if line.startswith("h_wait_console"):
                    self.assertRegex(line, r"h_wait_console ('[^']*'|\S+) \d+ ")
            self.assertEqual(script.count("@@soak-iter"), 2 + (1 if scenario != "boot" else 0))

    def test_only_viommu_runs_in_two_vcpu_hosts(self):
        self.assertEqual(soak.HOST_CPUS, {"viommu": 2})


if __name__ == "__main__":
    unittest.main()


class FailedStepTest(unittest.TestCase):
    def test_a_failed_step_stops_the_tcp_sink_so_the_next_vm_can_listen(self):
        import subprocess
        script = ("h_vmm_stop() { :; }\n"
                  "sleep 300 & SINK=$!\n"
                  "echo $SINK > \"$1\"\n"
                  f"false || {soak._fail('lazy: stream and ping')}\n"
                  "echo not reached\n")
        import tempfile, os
        with tempfile.NamedTemporaryFile() as pidfile:
            p = subprocess.run(["sh", "-c", script, "sh", pidfile.name], capture_output=True,
                               text=True, timeout=20)
            pid = int(open(pidfile.name).read())
        self.assertEqual(p.stdout, "@@soak fail lazy: stream and ping\n")
        self.assertEqual(p.returncode, 0)
        # Reaped by the script's wait: no such process any more.
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)
