"""Unit tests of the parents scenario: how device IOTLB updates are derived
from the messages a VMM sent, the parsing of its sections, the script and
the side-by-side table."""

import json
import subprocess
import tempfile
import unittest

from benchlib import compare, report, scenarios, testhost, vmms


def counters(update, invalidate, begin, end, requests=None):
    """This project's `counters` as microvm-ctl prints it (the fields read)."""
    data = {"devices": [{"name": "net0", "iotlb_update": update, "iotlb_invalidate": invalidate,
                         "batch_begin": begin, "batch_end": end}]}
    if requests is not None:
        data["iommu"] = {"requests": {"map": {"ok": requests[0]}, "unmap": {"ok": requests[1]}}}
    return json.dumps(data)


def qemu(update, invalidate, begin, end, unbatched, maps=0, unmaps=0):
    return json.dumps({"iotlb_update": update, "iotlb_invalidate": invalidate, "batch_begin": begin,
                       "batch_end": end, "map": maps, "unmap": unmaps, "unbatched": unbatched})


class DeviceUpdatesTest(unittest.TestCase):
    def test_set_map_rebuilds_once_per_batch_end_and_per_unbatched_message(self):
        c = {"iotlb_update": 10, "iotlb_invalidate": 4, "batch_begin": 3, "batch_end": 3}
        self.assertEqual(scenarios.device_updates(c, 0, "set_map"), 3)
        # Two messages outside the three batches: two rebuilds more.
        self.assertEqual(scenarios.device_updates(c, 2, "set_map"), 5)

    def test_dma_map_calls_once_per_update_or_invalidate_whatever_the_batches(self):
        c = {"iotlb_update": 10, "iotlb_invalidate": 4, "batch_begin": 3, "batch_end": 3}
        self.assertEqual(scenarios.device_updates(c, 0, "dma_map"), 14)
        self.assertEqual(scenarios.device_updates(c, 14, "dma_map"), 14)

    def test_unknown_model_is_refused(self):
        with self.assertRaises(ValueError):
            scenarios.device_updates({"iotlb_update": 1, "iotlb_invalidate": 0, "batch_end": 0}, 0, "pinned")


class UnbatchedTest(unittest.TestCase):
    def test_project_batched_sends_nothing_outside_a_batch(self):
        self.assertEqual(vmms.parse_unbatched(counters(7, 2, 3, 3)), 0)

    def test_project_unbatched_sends_everything_outside(self):
        self.assertEqual(vmms.parse_unbatched(counters(7, 2, 0, 0)), 9)

    def test_qemu_reads_the_key_walked_from_its_trace(self):
        self.assertEqual(vmms.parse_unbatched(qemu(7, 2, 1, 1, 5)), 5)

    def test_qemu_without_the_key_is_an_error(self):
        with self.assertRaises(KeyError):
            vmms.parse_unbatched(json.dumps({"iotlb_update": 1}))

    def test_the_awk_walk_follows_the_kernel_in_batch_flag(self):
        # QEMU's log backend: pid@seconds:event args. One batch of two maps,
        # then two IOMMU-notifier messages outside any batch, another batch
        # of one unmap, and one more unbatched map.
        trace = "\n".join([
            "11@1.0:vhost_vdpa_listener_begin_batch vdpa:0x1 fd: 3 msg_type: 2 type: 5",
            "11@1.1:vhost_vdpa_dma_map vdpa:0x1 fd: 3 msg_type: 2 asid: 0 iova: 0x0 size: 0x1000",
            "11@1.2:vhost_vdpa_dma_map vdpa:0x1 fd: 3 msg_type: 2 asid: 0 iova: 0x1000 size: 0x1000",
            "11@1.3:vhost_vdpa_listener_commit vdpa:0x1 fd: 3 msg_type: 2 type: 6",
            "11@2.0:virtio_iommu_map domain=1 virt_start=0x0",
            "11@2.1:vhost_vdpa_dma_map vdpa:0x1 fd: 3 msg_type: 2 asid: 0 iova: 0x2000 size: 0x1000",
            "11@2.2:vhost_vdpa_dma_unmap vdpa:0x1 fd: 3 msg_type: 2 asid: 0 iova: 0x2000 size: 0x1000",
            "11@3.0:vhost_vdpa_listener_begin_batch vdpa:0x1 fd: 3 msg_type: 2 type: 5",
            "11@3.1:vhost_vdpa_dma_unmap vdpa:0x1 fd: 3 msg_type: 2 asid: 0 iova: 0x0 size: 0x1000",
            "11@3.2:vhost_vdpa_listener_commit vdpa:0x1 fd: 3 msg_type: 2 type: 6",
            "11@4.0:vhost_vdpa_dma_map vdpa:0x1 fd: 3 msg_type: 2 asid: 1 iova: 0x9000 size: 0x1000",
        ]) + "\n"
        with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
            f.write(trace)
            f.flush()
            out = subprocess.run(["awk", vmms.QEMU_UNBATCHED_AWK, f.name], stdout=subprocess.PIPE,
                                 text=True, check=True).stdout
        self.assertEqual(out.strip(), "3")
        # And the same trace, counted as the snapshot counts it, derives
        # 2 batch ends + 3 unbatched = 5 rebuilds on a set_map parent.
        c = {"iotlb_update": 4, "iotlb_invalidate": 2, "batch_begin": 2, "batch_end": 2}
        self.assertEqual(scenarios.device_updates(c, int(out), "set_map"), 5)
        self.assertEqual(scenarios.device_updates(c, int(out), "dma_map"), 6)

    def test_the_shell_function_prints_zero_without_a_trace_log(self):
        script = vmms.QEMU_UNBATCHED_FN.replace(vmms.QEMU_TRACE_LOG, "/nonexistent/trace.log") + "qemu_unbatched\n"
        out = subprocess.run(["sh", "-c", script], stdout=subprocess.PIPE, text=True, check=True).stdout
        self.assertEqual(out, "0\n")


def sections(d):
    return "".join(f"@@section {k}\n{v}\n" for k, v in d.items())


def phase(tag, after, before=None, rebuilds="0 0", done=None, ready="1"):
    d = {f"{tag}-ready": ready, f"{tag}-after": after, f"{tag}-rebuilds": rebuilds,
         f"{tag}-vmm-stderr": "", f"{tag}-console-tail": ""}
    if before is not None:
        d[f"{tag}-before"] = before
    if done is not None:
        d[f"{tag}-done"] = done
    return d


class ParseParentsTest(unittest.TestCase):
    def run_of(self, d):
        return testhost.Run(sections(d), 0, 0, [])

    def test_batched_project_on_set_map_and_dma_map(self):
        d = {}
        for p in ("vdpa_sim_setmap", "vdpa_sim_dmamap"):
            d.update(phase(f"{p}-boot", counters(4, 0, 1, 1)))
            d.update(phase(f"{p}-lazy", counters(104, 50, 41, 41, (90, 60)), counters(4, 0, 1, 1, (10, 0)),
                           done="parents-done rx=53"))
            d.update(phase(f"{p}-strict", counters(204, 150, 201, 201, (110, 100)),
                           counters(4, 0, 1, 1, (10, 0)), done="parents-done rx=52"))
        metrics, errors = scenarios.parse_parents(self.run_of(d), vmms.PROJECT,
                                                  ["vdpa_sim_setmap", "vdpa_sim_dmamap"])
        self.assertEqual(errors, {})
        self.assertEqual(metrics["vdpa_sim_setmap_boot_iotlb_messages"], 6)
        self.assertEqual(metrics["vdpa_sim_setmap_boot_device_updates"], 1)
        self.assertEqual(metrics["vdpa_sim_dmamap_boot_device_updates"], 4)
        # Lazy window: 100 updates, 50 invalidates, 40 batches; 140 requests.
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_iotlb_messages"], 230)
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_requests"], 140)
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_device_updates"], 40)
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_requests_per_update"], 3.5)
        self.assertEqual(metrics["vdpa_sim_dmamap_lazy_device_updates"], 150)
        self.assertEqual(metrics["vdpa_sim_dmamap_lazy_requests_per_update"], 0.93)
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_messages_per_request"], 1.64)
        self.assertEqual(metrics["vdpa_sim_setmap_strict_rx_looped"], 52)
        self.assertNotIn("vdpa_sim_setmap_lazy_rebuilds_counted", metrics)

    def test_qemu_unbatched_notifier_messages_each_rebuild_a_set_map_parent(self):
        d = phase("vdpa_sim_setmap-lazy", qemu(300, 200, 3, 3, 490, 260, 240), qemu(10, 0, 3, 3, 0),
                  done="parents-done rx=50")
        d.update(phase("vdpa_sim_setmap-boot", qemu(10, 0, 3, 3, 0)))
        metrics, errors = scenarios.parse_parents(self.run_of(d), vmms.PEERS["qemu10"], ["vdpa_sim_setmap"])
        self.assertEqual(metrics["vdpa_sim_setmap_boot_device_updates"], 3)
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_device_updates"], 490)
        self.assertEqual(metrics["vdpa_sim_setmap_lazy_requests"], 500)
        self.assertIn("vdpa_sim_setmap-strict", errors)  # no sections for it: named, not fatal

    def test_vduse_keeps_its_own_count_beside_the_derived_one(self):
        d = phase("vduse-boot", counters(4, 0, 1, 1), rebuilds="0 1")
        metrics, _errors = scenarios.parse_parents(self.run_of(d), vmms.PROJECT, ["vduse"])
        self.assertEqual(metrics["vduse_boot_rebuilds_counted"], 1)
        self.assertEqual(metrics["vduse_boot_device_updates"], 1)

    def test_a_guest_that_never_finished_or_got_no_request_is_an_error(self):
        d = phase("vdpa_sim_dmamap-lazy", counters(5, 0, 1, 1, (10, 0)), counters(4, 0, 1, 1, (10, 0)),
                  done="")
        d.update(phase("vdpa_sim_dmamap-strict", counters(5, 0, 1, 1, (10, 0)),
                       counters(4, 0, 1, 1, (10, 0)), done="parents-done rx=3"))
        d.update(phase("vdpa_sim_dmamap-boot", "", ready="0"))
        d["vdpa_sim_dmamap-lazy-vmm-stderr"] = "qemu: SVQ can not work while IOMMU enable"
        metrics, errors = scenarios.parse_parents(self.run_of(d), vmms.PROJECT, ["vdpa_sim_dmamap"])
        self.assertEqual(metrics, {})
        self.assertIn("never said it was done", errors["vdpa_sim_dmamap-lazy"])
        self.assertIn("no vIOMMU request", errors["vdpa_sim_dmamap-strict"])
        self.assertIn("never got ready", errors["vdpa_sim_dmamap-boot"])

    def test_a_window_where_no_frame_came_back_is_an_error_with_the_vmm_words(self):
        d = phase("vdpa_sim_setmap-lazy", qemu(4, 0, 0, 0, 4, 362, 103), qemu(4, 0, 0, 0, 4, 259, 0),
                  done="parents-done rx=0")
        d["vdpa_sim_setmap-lazy-vmm-stderr"] = "qemu: SVQ can not work while IOMMU enable"
        metrics, errors = scenarios.parse_parents(self.run_of(d), vmms.PEERS["qemu10"], ["vdpa_sim_setmap"])
        self.assertNotIn("vdpa_sim_setmap_lazy_requests", metrics)
        self.assertIn("no frame came back", errors["vdpa_sim_setmap-lazy"])
        self.assertIn("SVQ can not work", errors["vdpa_sim_setmap-lazy"])

    def test_garbage_counters_are_an_error_not_a_crash(self):
        d = phase("vdpa_sim_setmap-boot", "{not json")
        _metrics, errors = scenarios.parse_parents(self.run_of(d), vmms.PROJECT, ["vdpa_sim_setmap"])
        self.assertIn("counters unreadable", errors["vdpa_sim_setmap-boot"])


class ScriptTest(unittest.TestCase):
    def test_each_parent_is_set_up_and_every_command_names_its_node(self):
        script, commands = scenarios.parents_script(vmms.PEERS["qemu10"], list(scenarios.PARENTS))
        self.assertIn("h_parent_load vdpa_sim_net batch_mapping=0 ", script)
        self.assertIn("h_vdpa_add vdpasim_net sim0 --mac 52:54:00:aa:bb:cc", script)
        self.assertIn("h_vduse_start net0 --loopback", script)
        self.assertNotIn(scenarios.DEV_PLACEHOLDER, script)  # substituted everywhere
        self.assertIn('vhostdev="$dev"', script)
        self.assertIn("vhostdev=/dev/vhost-vdpa-N", commands["vdpa_sim_dmamap"]["strict"])
        self.assertIn("iommu.strict=1", " ".join(vmms.shlex.split(commands["vdpa_sim_dmamap"]["strict"])))
        self.assertIn("-device virtio-iommu-pci", commands["vdpa_sim_setmap"]["lazy"])
        self.assertNotIn("virtio-iommu", commands["vdpa_sim_setmap"]["boot"])
        # Behind the vIOMMU on vdpa_sim_net QEMU hides the control queue, as
        # microvm does; not at boot, nor on vduse-net (which has none).
        self.assertIn(",ctrl_vq=off,", commands["vdpa_sim_setmap"]["lazy"])
        self.assertNotIn("ctrl_vq", commands["vdpa_sim_setmap"]["boot"])
        self.assertNotIn("ctrl_vq", commands["vduse"]["strict"])
        subprocess.run(["sh", "-n", "-c", script], check=True)

    def test_the_project_rows_keep_their_batching_option(self):
        _s, commands = scenarios.parents_script(vmms.PROJECT_UNBATCHED, ["vdpa_sim_setmap"])
        self.assertIn("--net vdpa=/dev/vhost-vdpa-N,iommu=on,iotlb-batch=off",
                      commands["vdpa_sim_setmap"]["lazy"])

    def test_the_guest_command_fits_on_the_kernel_command_line(self):
        _s, commands = scenarios.parents_script(vmms.PROJECT, ["vdpa_sim_setmap"])
        cmdline = vmms.shlex.split(commands["vdpa_sim_setmap"]["strict"])
        self.assertLess(len(cmdline[cmdline.index("--cmdline") + 1]), 2048)

    def test_the_other_scenarios_still_use_the_fixed_node(self):
        argv = vmms.shell(vmms.qemu_argv(vmms.PEERS["qemu10"], "pc", 256, 1, "true"))
        self.assertIn("vhost-vdpa,id=n0,vhostdev=/dev/vhost-vdpa-0", argv)
        self.assertIn("vdpa=/dev/vhost-vdpa-0", vmms.shell(vmms.project_argv(vmms.PROJECT, 256, 1, "true")))


class TableTest(unittest.TestCase):
    def test_side_by_side_columns_per_parent_and_vmm(self):
        parents = ["vdpa_sim_setmap", "vdpa_sim_dmamap"]
        rows = [vmms.PROJECT, vmms.PEERS["qemu10"]]
        records = []
        for vmm, figure in ((vmms.PROJECT, 3), (vmms.PEERS["qemu10"], 7)):
            records.append({"vmm": vmm.id, "ok": True, "retries": 0, "command": "x", "metrics": {
                "vdpa_sim_setmap_lazy_device_updates": figure, "vdpa_sim_dmamap_lazy_device_updates": figure * 10}})
        s = compare.summary("parents", rows, records, {}, scenarios.parents_metrics(parents))
        s["parents"] = {p: scenarios.PARENTS[p]["label"] for p in parents}
        table = report._parents_table(s)
        lines = table.splitlines()
        self.assertEqual(lines[0], "| metric | microvm — vdpa_sim_net, set_map | QEMU 10.0 — vdpa_sim_net, set_map "
                                   "| microvm — vdpa_sim_net, dma_map (batch_mapping=0) "
                                   "| QEMU 10.0 — vdpa_sim_net, dma_map (batch_mapping=0) |")
        row = next(l for l in lines if l.startswith("| lazy: device IOTLB updates"))
        self.assertTrue(row.endswith("| 3 | 7 | 30 | 70 |"), row)
        # Rows no parent has are left out; vduse's own count is not there.
        self.assertNotIn("counted by vduse-net", table)
        self.assertEqual(len(lines), 3)
        page, _summaries = report.render([{"type": "meta"}, dict(s, type="summary")])
        self.assertIn("## parents", page)
        self.assertIn("How device updates are derived", page)
        self.assertIn(table, page)


if __name__ == "__main__":
    unittest.main()
