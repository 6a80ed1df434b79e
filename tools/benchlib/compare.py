"""tools/bench compare: every scenario for this project and each QEMU peer,
each run in a fresh test host, VMMs alternating; JSON lines out (one per run,
one summary per scenario) and docs/comparison.md rewritten from them."""

import datetime
import json
import os
import platform
import re
import subprocess
import sys

from . import scenarios, stats, testhost, vmms
from .testhost import REPO, TESTBED, log

SCENARIOS = ["boot", "hotplug", "viommu", "parents"]
BOOT_MEMORY_MIB = 256
BOOT_CPUS = 1
# vCPUs of the emulated test host, i.e. host CPUs the VMMs run on. viommu
# gets two: the guest's virtio-iommu driver spins on its vCPU until each
# request completes, and on one host CPU the VMM's request thread (QEMU's
# main loop, our device worker) and vduse-net only run when the scheduler
# preempts that spinning vCPU, which no real deployment of a vIOMMU does.
HOST_CPUS = {"boot": 1, "hotplug": 1, "viommu": 2, "parents": 2}


def host_cpus(args, scenario):
    return args.host_cpus or HOST_CPUS[scenario]


def machine_info():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else ""
        with open("/proc/meminfo") as f:
            mem_kib = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        mem_kib = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / (1 << 20), 1),
            "kernel": platform.release()}


def meta(args, peers_info):
    paths = json.loads(subprocess.run([str(TESTBED), "paths", "--json"], stdout=subprocess.PIPE,
                                      text=True, check=True).stdout)
    rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    return {
        "type": "meta",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "tools/bench compare " + " ".join(args.argv),
        "runs": args.runs,
        "scenarios": args.scenarios,
        "machine": machine_info(),
        "test_host": {"kind": "emulated (QEMU TCG, nested SVM)",
                      "vcpus": {sc: host_cpus(args, sc) for sc in args.scenarios}, "memory_mib": 4096,
                      "kernel": paths.get("host_kernel_release")},
        "guest": {"kernel": paths.get("guest_kernel_release"), "vcpus": BOOT_CPUS},
        "versions": {"microvm": rev, **{p: i["version"] for p, i in peers_info.items()}},
        "peer_packages": {p: i["packages"] for p, i in peers_info.items()},
        "qemu_machine": {"boot": {p: {"machine": vmms.MACHINES[vmms.BOOT_MACHINE[p]],
                                      "why": vmms.BOOT_MACHINE_WHY[p]} for p in args.peers},
                         "hotplug": {"machine": vmms.MACHINES["pc"],
                                     "why": "DIMM hotplug needs ACPI memory hotplug: pc has it, microvm not"}},
    }


def emit(record, out):
    line = json.dumps(record)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def raw_log(args, scenario, vmm, n):
    """Where the raw test-host output of one run is kept (next to --json-out)."""
    d = os.path.join(os.path.dirname(os.path.abspath(args.json_out)), "raw")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{scenario}-{vmm.id}-{n}.log")
    if os.path.exists(path):
        os.unlink(path)
    return path


def run_boot(vmm, args, n):
    script, command = scenarios.boot_script(vmm, BOOT_MEMORY_MIB, BOOT_CPUS)
    run = testhost.run(script, peers=[vmm.peer] if vmm.is_qemu else [], timeout=600,
                       retries=args.retries, cpus=host_cpus(args, "boot"), keep=raw_log(args, "boot", vmm, n))
    record = {"command": command, "retries": run.retries, "lost": run.lost}
    try:
        record["metrics"] = scenarios.parse_boot(run)[0]
        record["ok"] = True
    except scenarios.ScenarioError as e:
        record.update(ok=False, error=str(e))
    return record


def run_hotplug(vmm, args, n):
    script, commands = scenarios.hotplug_script(vmm)
    run = testhost.run(script, peers=[vmm.peer] if vmm.is_qemu else [], timeout=900,
                       retries=args.retries, cpus=host_cpus(args, "hotplug"), keep=raw_log(args, "hotplug", vmm, n))
    record = {"command": commands["hotplug"], "commands": commands, "retries": run.retries,
              "lost": run.lost}
    if vmm.is_qemu:
        record["variant"] = "DIMM (pc-dimm, memory-backend-memfd share=on, device_add over QMP)"
    try:
        record["metrics"], record["notes"] = scenarios.parse_hotplug(run, vmm)
        record["ok"] = True
    except scenarios.ScenarioError as e:
        record.update(ok=False, error=str(e))
        if vmm.is_qemu and run.section("virtio-mem-stderr") is not None:
            record["notes"] = {"virtio_mem": (run.section("virtio-mem-stderr") or "").strip()[-300:]}
    return record


VIOMMU_TRANSFER_MIB = 1
VIOMMU_PINGS = 50


def run_viommu(vmm, args, n):
    """One viommu run. A guest that reset itself mid-run (no panic on its
    console: the emulated test host's guest triple faults, which QEMU's guests
    show too, see the README) is run again in a fresh test host, up to
    --retries times, for every VMM alike; each such reset is kept in the
    record's `guest_resets`."""
    script, commands = scenarios.viommu_script([vmm], VIOMMU_TRANSFER_MIB, VIOMMU_PINGS)
    guest_resets, lost, retries = [], [], 0
    while True:
        run = testhost.run(script, peers=[vmm.peer] if vmm.is_qemu else [],
                           timeout=scenarios.viommu_host_timeout(1, VIOMMU_TRANSFER_MIB), bounded=True,
                           retries=args.retries,
                           cpus=host_cpus(args, "viommu"),
                           keep=raw_log(args, "viommu", vmm, f"{n}-{len(guest_resets)}"))
        lost += run.lost
        retries += run.retries
        record = {"command": commands[vmm.id]["lazy"], "commands": commands[vmm.id],
                  "workload": {"transfer_mib": VIOMMU_TRANSFER_MIB, "pings": VIOMMU_PINGS}}
        try:
            record["metrics"] = scenarios.parse_viommu(run, vmm, VIOMMU_TRANSFER_MIB)
            record["ok"] = True
        except scenarios.ScenarioError as e:
            record.update(ok=False, error=str(e))
            if e.guest_reset and len(guest_resets) < args.retries:
                guest_resets.append(str(e)[:300])
                log(f"viommu {vmm.label}: the guest reset itself mid-run ({str(e)[:120]}); "
                    "running it again in a fresh test host")
                continue
        record.update(retries=retries, lost=lost, guest_resets=guest_resets)
        return record


def run_parents(vmm, args, n):
    """One test host per VMM: every parent of --parents in turn, each with a
    boot VM and a VM behind the vIOMMU per guest mode. A phase that failed
    leaves its figures out and its reason in `phase_errors`; the run is ok
    when at least one phase completed."""
    script, commands = scenarios.parents_script(vmm, args.parents)
    run = testhost.run(script, peers=[vmm.peer] if vmm.is_qemu else [],
                       timeout=scenarios.parents_host_timeout(len(args.parents)), bounded=True,
                       retries=args.retries, cpus=host_cpus(args, "parents"),
                       keep=raw_log(args, "parents", vmm, n))
    record = {"command": commands[args.parents[0]]["boot"], "commands": commands,
              "parents": args.parents, "retries": run.retries, "lost": run.lost}
    metrics, errors = scenarios.parse_parents(run, vmm, args.parents)
    record.update(metrics=metrics, phase_errors=errors, ok=bool(metrics))
    if not metrics:
        record["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())[:600] or \
            f"no section at all (test host exit {run.status})"
    return record


METRICS = {"boot": scenarios.BOOT_METRICS, "hotplug": scenarios.HOTPLUG_METRICS,
           "viommu": scenarios.VIOMMU_METRICS}


def summary(scenario, rows, records, notes, metric_list=None):
    """One summary record: per metric and VMM median/min/max, ratios of each
    project row to each peer, failures with their reasons, retries."""
    by_vmm = {vmm.id: [r for r in records if r["vmm"] == vmm.id] for vmm in rows}
    metrics = {}
    for key, label, unit in metric_list or METRICS[scenario]:
        metrics[key] = {"label": label, "unit": unit, "values": {}}
        for vmm in rows:
            s = stats.summarize([r["metrics"].get(key) for r in by_vmm[vmm.id] if r["ok"]])
            metrics[key]["values"][vmm.id] = s
        metrics[key]["ratios"] = {}
        pairs = [(mine, peer) for mine in rows if not mine.is_qemu for peer in rows if peer.is_qemu]
        # What batching alone buys: the project against itself with iotlb-batch=off.
        if vmms.PROJECT in rows and vmms.PROJECT_UNBATCHED in rows:
            pairs.append((vmms.PROJECT, vmms.PROJECT_UNBATCHED))
        for mine, peer in pairs:
            metrics[key]["ratios"][f"{mine.id}/{peer.id}"] = stats.ratio(
                metrics[key]["values"][mine.id], metrics[key]["values"][peer.id])
    failures = {v.id: [r["error"] for r in by_vmm[v.id] if not r["ok"]] for v in rows}
    return {
        "type": "summary", "scenario": scenario,
        "vmms": {v.id: v.label for v in rows},
        "metrics": metrics,
        "completed": {v.id: sum(1 for r in by_vmm[v.id] if r["ok"]) for v in rows},
        "failures": {k: v for k, v in failures.items() if v},
        "retries": {v.id: sum(r["retries"] for r in by_vmm[v.id]) for v in rows},
        "guest_resets": {v.id: sum(len(r.get("guest_resets", [])) for r in by_vmm[v.id]) for v in rows},
        "commands": {v.id: (by_vmm[v.id][0]["commands"] if by_vmm[v.id] and "commands" in by_vmm[v.id][0]
                            else by_vmm[v.id][0]["command"] if by_vmm[v.id] else None) for v in rows},
        "notes": notes,
    }


def compare(args):
    peers = [vmms.PEERS[p] for p in args.peers]
    if not args.no_assets:
        subprocess.run([str(TESTBED), "assets"], check=True)
    peers_info = json.loads(subprocess.run([str(TESTBED), "peers", "--json"] + args.peers,
                                           stdout=subprocess.PIPE, text=True, check=True).stdout) \
        if args.peers else {}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    records_all = []
    with open(args.json_out, "w") as out:
        m = meta(args, peers_info)
        emit(m, out)
        records_all.append(m)
        for scenario in args.scenarios:
            notes = {}
            rows = [vmms.PROJECT] + peers
            if scenario == "viommu":
                # vhost-vdpa behind a vIOMMU needs QEMU 8.1 or later.
                rows = [vmms.PROJECT, vmms.PROJECT_UNBATCHED] + [p for p in peers if p.id == "qemu10"]
                if "qemu72" in args.peers:
                    notes["QEMU 7.2"] = (
                        "no row: it cannot put a vhost-vdpa device behind a vIOMMU (vhost-vdpa's IOMMU "
                        "notifier support came in QEMU 8.1). Tried once in the test host with the same "
                        "command line as QEMU 10.0: it starts without a word, then gives the device all "
                        "guest RAM at IOVA = GPA (5 entries, 512 MiB) while the guest's driver uses "
                        "translated IOVAs (rings at 0xffffc000 and up): vduse-net cannot reach the rings, "
                        "the guest's TX queue times out and no packet passes (3 of 3 pings lost).")
            if scenario == "hotplug":
                rows.insert(1, vmms.PROJECT_UNBATCHED)
            if scenario == "parents":
                # Behind the vIOMMU as in viommu: QEMU 7.2 cannot.
                rows = [vmms.PROJECT, vmms.PROJECT_UNBATCHED] + [p for p in peers if p.id == "qemu10"]
                if "qemu72" in args.peers:
                    notes["QEMU 7.2"] = "no column: it cannot put a vhost-vdpa device behind a vIOMMU (see viommu)"
            runner = {"boot": run_boot, "hotplug": run_hotplug, "viommu": run_viommu,
                      "parents": run_parents}[scenario]
            records = []
            for n in range(args.runs):
                # Alternate the order so no VMM always runs first or last.
                order = rows[n % len(rows):] + rows[:n % len(rows)]
                for vmm in order:
                    log(f"{scenario}: run {n + 1}/{args.runs}, {vmm.label}")
                    # The test host is emulated, so what else runs on this machine
                    # shows in every figure: keep the load each run started under.
                    load = round(os.getloadavg()[0], 2)
                    record = {"type": "run", "scenario": scenario, "vmm": vmm.id, "label": vmm.label,
                              "run": n, "host_load_1m": load, **runner(vmm, args, n)}
                    if not record["ok"]:
                        log(f"{scenario}: {vmm.label} run {n + 1} failed: {record['error']}")
                    emit(record, out)
                    records.append(record)
                    records_all.append(record)
            for r in records:
                for k, v in (r.get("notes") or {}).items():
                    notes.setdefault(r["vmm"], {}).setdefault(k, v)
                for k, v in (r.get("phase_errors") or {}).items():
                    notes.setdefault(r["vmm"], {}).setdefault(f"{k} (run {r['run'] + 1})", v[:300])
            if scenario == "parents":
                s = summary(scenario, rows, records, notes, scenarios.parents_metrics(args.parents))
                s["parents"] = {p: scenarios.PARENTS[p]["label"] for p in args.parents}
                s["models"] = {p: scenarios.PARENTS[p]["model"] for p in args.parents}
            else:
                s = summary(scenario, rows, records, notes)
            emit(s, out)
            records_all.append(s)
    if not args.no_docs:
        from . import report
        kept = kept_scenarios(os.path.join(args.docs, "comparison.jsonl"), args.scenarios)
        if kept:
            log("the page keeps, from its earlier run, the scenarios not re-run now: "
                + ", ".join(sorted({r["scenario"] for r in kept})))
        report.write(records_all + kept, args.docs)
        with open(os.path.join(args.docs, "comparison.jsonl"), "w") as f:
            for record in records_all + kept:
                f.write(json.dumps(record) + "\n")
        log(f"wrote {args.docs}/comparison.md and {args.docs}/comparison.png")
    return 0


def kept_scenarios(path, rerun):
    """The run and summary records of the scenarios that `path` (the page's
    earlier data) has and this run did not re-run, each summary marked with
    the run that produced it, so one command can refresh one scenario."""
    try:
        old = load(path)
    except (OSError, ValueError):
        return []
    meta = next((r for r in old if r.get("type") == "meta"), {})
    generated = {k: meta.get(k) for k in ("command", "date", "versions", "test_host")}
    kept = []
    for r in old:
        if r.get("type") in ("run", "summary") and r.get("scenario") not in rerun:
            if r["type"] == "summary" and "generated" not in r:
                r = dict(r, generated=generated)
            kept.append(r)
    return kept


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
