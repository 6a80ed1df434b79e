"""docs/comparison.md and its plot, written from the JSON records of
tools/bench compare (the same records it prints)."""

import os

COLORS = {"project": "#1f77b4", "project-unbatched": "#9ecae1", "qemu10": "#d62728", "qemu72": "#ff9896"}


def _fmt(s, unit):
    if not s:
        return "—"
    if s["min"] == s["max"]:
        return f"{s['median']:g}"
    return f"{s['median']:g} ({s['min']:g}–{s['max']:g})"


def _ratio(r):
    return "—" if r is None else f"{r:.2f}×"


def _table(summary):
    vmms = summary["vmms"]
    ratio_keys = []
    for m in summary["metrics"].values():
        for k in m["ratios"]:
            if k not in ratio_keys:
                ratio_keys.append(k)

    def ratio_head(k):
        mine, peer = k.split("/")
        return f"{vmms[mine]} / {vmms[peer]}"
    head = ["metric"] + list(vmms.values()) + [ratio_head(k) for k in ratio_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in summary["metrics"].items():
        label = f"{m['label']} [{m['unit']}]"
        cells = [_fmt(m["values"].get(v), m["unit"]) for v in vmms]
        cells += [_ratio(m["ratios"].get(k)) for k in ratio_keys]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def _parents_table(summary):
    """The parents scenario side by side: per parent a column set, one
    column per VMM; rows are phase and metric."""
    from .scenarios import parents_rows
    vmms = summary["vmms"]
    parents = summary.get("parents") or {}
    head = ["metric"] + [f"{vlabel} — {plabel}" for plabel in parents.values() for vlabel in vmms.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for suffix, label, unit in parents_rows():
        cells = []
        for p in parents:
            m = summary["metrics"].get(f"{p}_{suffix}")
            cells += [_fmt(m["values"].get(v), unit) if m else "—" for v in vmms]
        if all(c == "—" for c in cells):
            continue
        lines.append("| " + " | ".join([f"{label} [{unit}]"] + cells) + " |")
    return "\n".join(lines)


def _commands(summary, runs):
    out = []
    for vid, label in summary["vmms"].items():
        cmd = summary.get("commands", {}).get(vid)
        if not cmd:
            continue
        out.append(f"{label}:\n")
        if isinstance(cmd, dict):
            for step, text in cmd.items():
                if isinstance(text, dict):  # parents: {parent: {phase: command}}
                    for phase, t in text.items():
                        out.append(f"```sh\n# {step}, {phase}\n{t}\n```\n")
                    continue
                out.append(f"```sh\n# {step}\n{text}\n```\n")
        else:
            out.append(f"```sh\n{cmd}\n```\n")
    return "\n".join(out)


def _notes(summary):
    lines = []
    for vid, n in (summary.get("notes") or {}).items():
        label = summary["vmms"].get(vid, vid)
        if isinstance(n, dict):
            for k, v in n.items():
                lines.append(f"- {label}, {k}: {v}")
        else:
            lines.append(f"- {label}: {n}")
    for vid, errors in (summary.get("failures") or {}).items():
        for e in sorted(set(errors)):
            lines.append(f"- {summary['vmms'][vid]}: {errors.count(e)} run(s) did not complete: {e}")
    retries = summary.get("retries") or {}
    resets = summary.get("guest_resets") or {}
    for vid, n in (summary.get("completed") or {}).items():
        reset_note = (f"; {resets[vid]} run again after the guest reset itself mid-run "
                      "(the emulated test host's guest triple faults, see the README)") if resets.get(vid) else ""
        lines.append(f"- {summary['vmms'][vid]}: {n} run(s) completed; "
                     f"{retries.get(vid, 0)} retried after the test host was lost{reset_note}")
    return "\n".join(lines)


def _host_vcpus(meta):
    """"1 vCPU", or per scenario where they differ (older pages: one number)."""
    v = meta.get("test_host", {}).get("vcpus", "?")
    if not isinstance(v, dict):
        return f"{v} vCPU"
    if len(set(v.values())) == 1:
        return f"{next(iter(v.values()))} vCPU"
    return "vCPUs " + ", ".join(f"{n} for {sc}" for sc, n in v.items())


IMAGE_ALT = "times, device IOTLB rebuilds and throughput per scenario"


def plot(summaries, path):
    """Boot time and rebuilds/messages at ready; per hotplug step rebuilds and time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    boot = summaries.get("boot")
    hot = summaries.get("hotplug")
    vio = summaries.get("viommu")
    if boot:
        panels += [("boot", ["ready_ms"], "boot: VMM start to guest ready", "ms"),
                   ("boot", ["device_iotlb_rebuilds", "iotlb_messages"],
                    "boot: device IOTLB rebuilds and IOTLB messages at ready", "count")]
    if hot:
        steps = [k[:-len("_rebuilds")] for k in hot["metrics"] if k.endswith("_rebuilds")]
        panels += [("hotplug", [f"{s}_rebuilds" for s in steps], "hotplug: device IOTLB rebuilds per step (microvm: virtio-mem; QEMU: DIMMs)", "count"),
                   ("hotplug", [f"{s}_ms" for s in steps], "hotplug: time to complete each step (microvm: virtio-mem; QEMU: DIMMs)", "ms")]
    if vio and vio.get("metrics"):
        modes = [k[:-len("_rebuilds_per_s")] for k in vio["metrics"] if k.endswith("_rebuilds_per_s")]
        panels += [("viommu", [f"{m}_rebuilds_per_s" for m in modes],
                    "viommu: device IOTLB rebuilds per second, guest in lazy and strict mode", "1/s"),
                   ("viommu", [f"{m}_requests_per_rebuild" for m in modes],
                    "viommu: vIOMMU requests per device IOTLB rebuild", "count"),
                   ("viommu", [f"{m}_tcp_kib_per_s" for m in modes],
                    "viommu: TCP throughput behind the vIOMMU", "KiB/s")]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.3 * len(panels)), squeeze=False)
    for ax, (scenario, keys, title, unit) in zip(axes[:, 0], panels):
        s = summaries[scenario]
        vids = list(s["vmms"])
        width = 0.8 / len(vids)
        for i, vid in enumerate(vids):
            xs, med, lo, hi = [], [], [], []
            for j, key in enumerate(keys):
                v = s["metrics"][key]["values"].get(vid)
                if not v:
                    continue
                xs.append(j + (i - (len(vids) - 1) / 2) * width)
                med.append(v["median"])
                lo.append(v["median"] - v["min"])
                hi.append(v["max"] - v["median"])
            bars = ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=s["vmms"][vid],
                          color=COLORS.get(vid, "#888888"))
            ax.bar_label(bars, labels=[f"{m:g}" for m in med], fontsize=7, padding=2)
            # A VMM with no figure for a bar (refused, not completed) is marked so.
            for j, key in enumerate(keys):
                if not s["metrics"][key]["values"].get(vid):
                    ax.text(j + (i - (len(vids) - 1) / 2) * width, 0, "n/a", ha="center",
                            va="bottom", fontsize=7, color=COLORS.get(vid, "#888888"))
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([s["metrics"][k]["label"].split(":")[0] if scenario in ("hotplug", "viommu")
                            else s["metrics"][k]["label"] for k in keys], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.002, "bars: median; whiskers: min–max over the runs", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(records, image_name="comparison.png"):
    meta = next((r for r in records if r.get("type") == "meta"), {})
    summaries = {r["scenario"]: r for r in records if r.get("type") == "summary"}
    runs = [r for r in records if r.get("type") == "run"]
    m = meta.get("machine", {})
    out = ["# microvm compared with QEMU", "",
           f"Generated by `{meta.get('command', 'tools/bench compare')}` on {meta.get('date', '?')}; "
           "do not edit by hand: the command rewrites this page and its plot. Every run boots a fresh "
           "emulated test host (QEMU TCG with nested SVM, see ../README.md), so the absolute figures are "
           "nested-virtualisation figures: compare the columns with each other, not with bare metal.", "",
           "`microvm` is this project. Every VMM boots the same guest (kernel and initramfs), with the same vCPUs and memory, and "
           "the same vDPA device: vduse-net behind the kernel's vhost-vdpa at /dev/vhost-vdpa-0. Device "
           "IOTLB rebuilds are counted by vduse-net (each is one VDUSE_UPDATE_IOTLB request, i.e. VDUSE "
           "rebuilding its whole IOTLB); IOTLB messages are this project's `counters` and, for QEMU, its "
           "trace events for each vhost_msg_v2 written to the vhost-vdpa fd (vhost_vdpa_dma_map, "
           "vhost_vdpa_dma_unmap, vhost_vdpa_listener_begin_batch, vhost_vdpa_listener_commit). "
           "Cells are median (min–max); ratios are this project's median over the peer's; below 1 "
           "means this project needs less.", "",
           "## Set-up", "",
           f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB, "
           f"Linux {m.get('kernel', '?')}",
           f"- test host: {meta.get('test_host', {}).get('kind', '?')}, "
           f"{_host_vcpus(meta)}, {meta.get('test_host', {}).get('memory_mib', '?')} MiB, "
           f"Linux {meta.get('test_host', {}).get('kernel', '?')}",
           f"- guest: Linux {meta.get('guest', {}).get('kernel', '?')}, {meta.get('guest', {}).get('vcpus', '?')} vCPU",
           f"- runs per VMM and scenario: {meta.get('runs', '?')}, each in a fresh test host, VMMs alternating",
           ""]
    out.append("Versions:")
    out.append("")
    for k, v in (meta.get("versions") or {}).items():
        pk = (meta.get("peer_packages") or {}).get(k)
        extra = ""
        if pk:
            extra = " — Debian packages " + ", ".join(
                f"{p} {i['version']} ({i['suite']})" for p, i in sorted(pk.items()))
        out.append(f"- {k}: {v}{extra}")
    out.append("")
    qm = meta.get("qemu_machine") or {}
    if qm:
        out.append("QEMU machine types:")
        out.append("")
        for peer, info in (qm.get("boot") or {}).items():
            out.append(f"- boot, {peer}: `-M {info['machine']}` — {info['why']}")
        if qm.get("hotplug"):
            out.append(f"- hotplug: `-M {qm['hotplug']['machine']}` — {qm['hotplug']['why']}")
        out.append("")
    if summaries:
        out += [f"![{IMAGE_ALT}]({image_name})", ""]
    for name in ("boot", "hotplug", "viommu", "parents"):
        s = summaries.get(name)
        if not s:
            continue
        out += [f"## {name}", ""]
        if name == "boot":
            out += ["VMM start to the guest's `microvm-guest: ready` line (timed by microvm-boot-timer, "
                    "which also reads the VMM's memory there); at that line the guest has probed the "
                    "virtio-net device and its memory is mapped for the vDPA device.", ""]
        if name == "hotplug":
            out += ["The same sequence for every VMM, on a guest of 256 MiB: plug 128 MiB, plug 256 MiB "
                    "more, unplug all. This project: virtio-mem (`microvm-ctl memory-resize`, which "
                    "returns when the guest has plugged or unplugged). QEMU: virtio-mem first (it is "
                    "refused next to vhost-vdpa, see the notes), then its best alternative: DIMMs "
                    "(`object-add` memory-backend-memfd share=on + `device_add pc-dimm` over QMP; "
                    "`device_del` to unplug). Every step is timed by the same meter (microvm-time "
                    "around the client). Counts are per step; ranges are what the device maps after it. "
                    "The steps are not the same work for the guest: the project's guest onlines "
                    "(and offlines) the virtio-mem memory before the step returns, while the guest "
                    "kernel (built for virtio-mem) has no ACPI memory-hotplug driver and never onlines "
                    "the DIMMs; QEMU maps a DIMM for the device at device_add all the same, which is "
                    "what the counts show, and the guest's ACPI core ejects it on device_del.", ""]
        if name == "viommu":
            out += ["The guest's net device behind a virtio-iommu, on the same vduse-net device, now on a "
                    "TAP in the test host. The guest brings its link up, then on the host's signal sends a "
                    "TCP stream (timed at the receiver, bytes checked) and a ping burst; the window runs "
                    "from the signal to the guest's done line. Once in Linux's default lazy mode and once "
                    "with `iommu.strict=1` (a sync after every unmap). This project: `--net "
                    "vdpa=PATH,iommu=on` (its own virtio-iommu, batched; and again with "
                    "`iotlb-batch=off`). QEMU 10.0: `-device virtio-iommu-pci` on `-M pc` (which "
                    "carries it with an ACPI VIOT) and the net device with `iommu_platform=on`. "
                    "vIOMMU requests are this project's `counters` → iommu and QEMU's virtio_iommu_map "
                    "and virtio_iommu_unmap trace events; rebuilds are counted by vduse-net for both, so "
                    "requests per rebuild is how many guest requests each device IOTLB rebuild carried.", ""]
        if name == "parents":
            out += ["The batching comparison on parents that apply mappings differently, side by side: "
                    "vduse-net (this project's VDUSE device, `--loopback`), and the kernel's vdpa_sim_net "
                    "loaded with its default `set_map` (the parent rebuilds its whole IOTLB per update) "
                    "and with `batch_mapping=0` (`dma_map`/`dma_unmap`, one call per message). Per parent "
                    "a column set, one column per VMM. `boot`: a VM of 256 MiB with the device "
                    "identity-mapped (no vIOMMU), read at the guest's ready line. `lazy`, `strict`: the "
                    "device behind the vIOMMU (512 MiB, as in viommu) in each guest mode; vdpa_sim_net has "
                    "no far end, so the guest sends 3 broadcast ARP requests (busybox arping) and a burst "
                    "of pings to the broadcast address with IPv6 off, which every parent loops back to "
                    "its RX queue (the last row counts the frames that came back: the device reached "
                    "the buffers the guest mapped); the window runs from the guest's ready line to its "
                    "done line, the VMM's counters read at both ends.", "",
                    "How device updates are derived (vdpa_sim exposes no rebuild log like vduse-net's): "
                    "from the messages the VMM wrote to /dev/vhost-vdpa-N, as the kernel's vhost-vdpa "
                    "hands them on. It keeps one in-batch flag per device, set by BATCH_BEGIN and cleared "
                    "by BATCH_END. A set_map parent rebuilds its IOTLB once per BATCH_END and once per "
                    "UPDATE or INVALIDATE sent outside a batch; a dma_map parent gets one dma_map call "
                    "per UPDATE and at least one dma_unmap per INVALIDATE (one per mapping it covers, so "
                    "the count is a floor there) and ignores the batch brackets. The messages: this "
                    "project's `counters` (its engine brackets every non-empty transaction when the "
                    "device acked IOTLB_BATCH and none with `iotlb-batch=off`, so either every message "
                    "is in a batch or none is); QEMU's trace events, walked in order to find the "
                    "UPDATE/INVALIDATE messages outside a begin_batch … commit bracket (its IOMMU "
                    "notifier sends each guest MAP/UNMAP unbatched). On vduse-net the rebuilds it counts "
                    "itself are shown too, a check of the derivation.", "",
                    "vdpa_sim_net offers a control queue (CTRL_VQ, in its own group and second address "
                    "space). This project's net layer never shows it to the guest. QEMU 10 shows it and "
                    "shadows it (SVQ) in address space 1: at boot it does, and those messages are "
                    "counted with the rest; behind the vIOMMU it cannot (\"SVQ can not work while IOMMU "
                    "enable\", then \"falling back on userspace virtio\": the guest's frames never reach "
                    "the device), so there its virtio-net gets `ctrl_vq=off` and the features that need "
                    "a control queue off, which is what this project shows the guest.", ""]
        gen = s.get("generated")
        if gen:
            out += [f"This section is kept from an earlier run, `{gen.get('command')}` on {gen.get('date')} "
                    f"(microvm {(gen.get('versions') or {}).get('microvm', '?')}); the command above did "
                    "not re-run this scenario.", ""]
        out += [_parents_table(s) if name == "parents" else _table(s), ""]
        vcpus = ((s.get("generated") or meta).get("test_host") or {}).get("vcpus")
        if isinstance(vcpus, dict):
            vcpus = vcpus.get(name)
        if vcpus:
            out += [f"Each run's test host had {vcpus} vCPU{'s' if vcpus != 1 else ''} (host CPUs for the VMM, "
                    "its threads and vduse-net)." + (" Two, because the guest's virtio-iommu driver spins on "
                    "its vCPU until each request completes: with one CPU the VMM's request thread and "
                    "vduse-net run only when the scheduler preempts that spinning vCPU." if name == "viommu" and vcpus > 1 else ""), ""]
        loads = [r["host_load_1m"] for r in runs if r.get("scenario") == name and "host_load_1m" in r]
        if loads:
            out += [f"This machine's load average (1 min) when the runs started: {min(loads):g}–{max(loads):g} "
                    f"on {m.get('cores', '?')} cores; the emulated test host slows down with it, so runs "
                    "under different loads spread.", ""]
        notes = _notes(s)
        if notes:
            out += ["Notes:", "", notes, ""]
        out += ["Command lines (exactly as run in the test host):", "", _commands(s, runs), ""]
    out += ["## Raw data", "", "`tools/bench compare` prints one JSON line per run and one summary per "
            "scenario (also kept in `--json-out`, and beside this page as comparison.jsonl when the "
            "command writes it); `tools/bench report --input FILE` rewrites this page from such a file.", ""]
    return "\n".join(out), summaries


def write(records, docs_dir):
    os.makedirs(docs_dir, exist_ok=True)
    text, summaries = render(records)
    plotted = plot(summaries, os.path.join(docs_dir, "comparison.png"))
    if not plotted:
        text = text.replace(f"![{IMAGE_ALT}](comparison.png)\n", "")
    with open(os.path.join(docs_dir, "comparison.md"), "w") as f:
        f.write(text)
