"""Unit tests of the bench library's parsers and statistics."""

import io
import json
import unittest
from pathlib import Path

from benchlib import stats, testhost, vmms

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures"


class SectionsTest(unittest.TestCase):
    def test_the_section_format_matches_the_e2e_harness(self):
        # tests/src/lib.rs checks the same fixture: one format, two readers.
        text = (FIXTURES / "sections.txt").read_text()
        expected = json.loads((FIXTURES / "sections.json").read_text())
        self.assertEqual(testhost.sections(text), expected)

    def test_no_marker_no_sections(self):
        self.assertEqual(testhost.sections("a\nb\n"), {})


class TeeTest(unittest.TestCase):
    def test_stderr_is_shown_live_and_kept_apart_from_stdout(self):
        live = io.StringIO()
        r = testhost.run_teeing_stderr(
            ["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3"], live=live)
        self.assertEqual(r.returncode, 3)
        self.assertEqual(r.stdout, "out1\nout2\n")
        self.assertEqual(r.stderr, "err1\nerr2\n")
        self.assertEqual(live.getvalue(), "err1\nerr2\n")

    def test_a_large_stdout_does_not_block_stderr(self):
        r = testhost.run_teeing_stderr(
            ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; head -c 300000 /dev/zero | tr '\\0' y >&2"],
            live=io.StringIO())
        self.assertEqual(len(r.stdout), 300000)
        self.assertEqual(len(r.stderr), 300000)


class StatsTest(unittest.TestCase):
    def test_summary_ignores_missing_values(self):
        self.assertEqual(stats.summarize([3, None, 1, 2]), {"median": 2, "min": 1, "max": 3, "runs": 3})

    def test_summary_of_nothing_is_none(self):
        self.assertIsNone(stats.summarize([None]))

    def test_even_counts_take_the_mean_of_the_middle_two(self):
        self.assertEqual(stats.summarize([1, 2, 3, 10])["median"], 2.5)

    def test_ratio_of_medians_and_its_gaps(self):
        a, b = stats.summarize([2, 2, 2]), stats.summarize([4, 4, 4])
        self.assertEqual(stats.ratio(a, b), 0.5)
        self.assertIsNone(stats.ratio(a, None))
        self.assertIsNone(stats.ratio(a, stats.summarize([0])))


class MessagesTest(unittest.TestCase):
    def test_project_counters_and_qemu_trace_counts_read_alike(self):
        qemu = '{"iotlb_update":5,"iotlb_invalidate":1,"batch_begin":0,"batch_end":0,"map":7,"unmap":3}'
        self.assertEqual(vmms.parse_iommu_requests(qemu), 10)
        project = json.dumps({"iommu": {"requests": {"map": {"ok": 4, "fault": 1}, "unmap": {"ok": 2},
                                                     "attach": {"ok": 9}}}})
        self.assertEqual(vmms.parse_iommu_requests(project), 7)

    def test_the_shell_quotes_what_it_must(self):
        self.assertEqual(vmms.shell(["a b", "c"]), "'a b' c")


if __name__ == "__main__":
    unittest.main()
