//! Engine tests: each asserts the exact message sequence the device receives
//! (through the recording backend, which also enforces the kernel's rules:
//! no overlapping UPDATE, INVALIDATE drops intersecting entries whole).

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const ASID: u32 = 0;

fn rw(iova: u64, size: u64, host: u64) -> DmaRange {
    DmaRange::new(iova, size, host, Perm::ReadWrite)
}

fn upd(iova: u64, size: u64, host: u64) -> IotlbMessage {
    IotlbMessage::Update {
        asid: ASID,
        range: rw(iova, size, host),
    }
}

fn inv(iova: u64, size: u64) -> IotlbMessage {
    IotlbMessage::Invalidate {
        asid: ASID,
        iova,
        size,
    }
}

const BEGIN: IotlbMessage = IotlbMessage::BatchBegin { asid: ASID };
const END: IotlbMessage = IotlbMessage::BatchEnd { asid: ASID };

fn mapper(batching: bool) -> DmaMapper<RecordingBackend> {
    DmaMapper::new(RecordingBackend::new(), 0..=(1u64 << 48) - 1, batching)
}

/// Commits `adds` and `removes` (adds first) and returns what was sent.
fn commit(
    m: &mut DmaMapper<RecordingBackend>,
    adds: &[DmaRange],
    removes: &[(u64, u64)],
) -> Vec<IotlbMessage> {
    let mut t = m.begin(ASID);
    for r in adds {
        t.add(*r);
    }
    for &(iova, size) in removes {
        t.remove(iova, size);
    }
    m.commit(t).unwrap();
    assert_in_sync(m);
    m.backend_mut().take_messages()
}

/// The engine's view is exactly what the (simulated) device holds.
fn assert_in_sync(m: &DmaMapper<RecordingBackend>) {
    assert_eq!(m.mappings(ASID), m.backend().device_iotlb(ASID));
    assert!(!m.backend().in_batch(), "batch left open");
}

// Host addresses of two separate RAM mmaps.
const HOST_LOW: u64 = 0x7f00_0000_0000;
const HOST_HIGH: u64 = 0x7f80_0000_0000;
// Hotplug area: guest 4 GiB + 1 GiB, in its own mmap.
const PLUG_GPA: u64 = 5 * GIB;
const PLUG_HOST: u64 = 0x7fc0_0000_0000;

/// Boot memory of a VM with 4 GiB RAM: 3 GiB below the PCI hole, 1 GiB
/// above 4 GiB.
fn boot(m: &mut DmaMapper<RecordingBackend>) -> Vec<IotlbMessage> {
    commit(
        m,
        &[rw(0, 3 * GIB, HOST_LOW), rw(4 * GIB, GIB, HOST_HIGH)],
        &[],
    )
}

#[test]
fn boot_memory_two_regions_around_a_hole_is_one_batch_with_two_updates() {
    let mut m = mapper(true);
    assert_eq!(
        boot(&mut m),
        vec![
            BEGIN,
            upd(0, 3 * GIB, HOST_LOW),
            upd(4 * GIB, GIB, HOST_HIGH),
            END
        ]
    );
    let c = m.counters();
    assert_eq!((c.batch_begin, c.batch_end), (1, 1));
    assert_eq!((c.iotlb_update, c.iotlb_invalidate), (2, 0));
    assert_eq!(c.bytes_mapped, 4 * GIB);
    assert_eq!(c.transactions, 1);
}

#[test]
fn boot_memory_given_in_pieces_is_coalesced_per_host_contiguous_region() {
    let mut m = mapper(true);
    // The memory manager may describe a region as several slots.
    let sent = commit(
        &mut m,
        &[
            rw(GIB, GIB, HOST_LOW + GIB),
            rw(0, GIB, HOST_LOW),
            rw(2 * GIB, GIB, HOST_LOW + 2 * GIB),
            rw(4 * GIB, GIB, HOST_HIGH),
        ],
        &[],
    );
    assert_eq!(
        sent,
        vec![
            BEGIN,
            upd(0, 3 * GIB, HOST_LOW),
            upd(4 * GIB, GIB, HOST_HIGH),
            END
        ]
    );
}

#[test]
fn commit_report_says_what_was_sent() {
    let mut m = mapper(true);
    let mut t = m.begin(ASID);
    t.add(rw(0, 3 * GIB, HOST_LOW));
    t.add(rw(4 * GIB, GIB, HOST_HIGH));
    let report = m.commit(t).unwrap();
    assert_eq!(
        report,
        CommitReport {
            updates: 2,
            invalidates: 0,
            batched: true
        }
    );
}

#[test]
fn transaction_adding_and_removing_several_ranges() {
    let mut m = mapper(true);
    let (ha, hb, hc, hd, he) = (
        0x10_0000_0000,
        0x20_0000_0000,
        0x30_0000_0000,
        0x40_0000_0000,
        0x50_0000_0000,
    );
    commit(
        &mut m,
        &[
            rw(0, 4 * MIB, ha),
            rw(8 * MIB, 4 * MIB, hb),
            rw(16 * MIB, 4 * MIB, hc),
        ],
        &[],
    );

    let mut t = m.begin(ASID);
    t.remove(8 * MIB, 4 * MIB); // all of B
    t.add(rw(32 * MIB, 4 * MIB, hd)); // new D
    t.remove(18 * MIB, 2 * MIB); // the tail of C
    t.add(rw(40 * MIB, 2 * MIB, he)); // E, removed again below: cancels
    t.add(rw(0, 4 * MIB, ha)); // identical to A: no-op
    t.remove(40 * MIB, 2 * MIB);
    t.remove(64 * MIB, 4 * MIB); // unmapped: no-op
    let report = m.commit(t).unwrap();
    assert_in_sync(&m);

    // B and C are both dropped whole, and nothing else lies between them:
    // one INVALIDATE. C's head is re-sent, A is untouched.
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![
            BEGIN,
            inv(8 * MIB, 12 * MIB),
            upd(16 * MIB, 2 * MIB, hc),
            upd(32 * MIB, 4 * MIB, hd),
            END
        ]
    );
    assert_eq!(
        report,
        CommitReport {
            updates: 2,
            invalidates: 1,
            batched: true
        }
    );
    assert_eq!(
        m.mappings(ASID),
        vec![
            rw(0, 4 * MIB, ha),
            rw(16 * MIB, 2 * MIB, hc),
            rw(32 * MIB, 4 * MIB, hd)
        ]
    );
    assert_eq!(m.counters().bytes_mapped, 10 * MIB);
}

#[test]
fn non_contiguous_host_memory_is_split_into_one_update_per_host_run() {
    let mut m = mapper(true);
    let sent = commit(
        &mut m,
        &[
            rw(0, 2 * MIB, 0x1000_0000),
            rw(2 * MIB, 2 * MIB, 0x5000_0000), // IOVA-adjacent, host jumps
            rw(4 * MIB, 2 * MIB, 0x5020_0000), // continues the previous one
            DmaRange::new(6 * MIB, 2 * MIB, 0x5040_0000, Perm::ReadOnly), // other perm
        ],
        &[],
    );
    assert_eq!(
        sent,
        vec![
            BEGIN,
            upd(0, 2 * MIB, 0x1000_0000),
            upd(2 * MIB, 4 * MIB, 0x5000_0000),
            IotlbMessage::Update {
                asid: ASID,
                range: DmaRange::new(6 * MIB, 2 * MIB, 0x5040_0000, Perm::ReadOnly)
            },
            END
        ]
    );
}

#[test]
fn iova_range_violation_refuses_the_whole_transaction() {
    let mut m = DmaMapper::new(RecordingBackend::new(), 0x1000..=0xffff_ffff, true);
    commit(&mut m, &[rw(0x1000, MIB, HOST_LOW)], &[]);
    let before = m.counters();

    // One good range, one that ends one byte past the (inclusive) end.
    let mut t = m.begin(ASID);
    t.add(rw(16 * MIB, MIB, HOST_HIGH));
    t.add(rw(0xffff_f000, 0x2000, HOST_HIGH + MIB));
    let err = m.commit(t).unwrap_err();
    assert!(
        matches!(
            err,
            DmaError::OutOfIovaRange {
                iova: 0xffff_f000,
                size: 0x2000,
                first: 0x1000,
                last: 0xffff_ffff
            }
        ),
        "{err:?}"
    );
    // Below the start.
    let mut t = m.begin(ASID);
    t.add(rw(0, 0x1000, HOST_HIGH));
    assert!(matches!(
        m.commit(t),
        Err(DmaError::OutOfIovaRange { iova: 0, .. })
    ));
    assert!(m.backend().messages().is_empty(), "nothing sent");
    assert_eq!(m.mappings(ASID), vec![rw(0x1000, MIB, HOST_LOW)]);
    assert_eq!(
        m.counters().failed_transactions,
        before.failed_transactions + 2
    );
    assert_eq!(m.counters().bytes_mapped, MIB);

    // Ending exactly on the inclusive end is fine.
    let sent = commit(&mut m, &[rw(0xffff_f000, 0x1000, HOST_HIGH)], &[]);
    assert_eq!(sent, vec![BEGIN, upd(0xffff_f000, 0x1000, HOST_HIGH), END]);
}

#[test]
fn ranges_at_the_top_of_the_address_space_do_not_overflow() {
    let mut m = DmaMapper::new(RecordingBackend::new(), 0..=u64::MAX, false);
    let top = u64::MAX - 0xfff;
    let sent = commit(&mut m, &[rw(top, 0x1000, HOST_LOW)], &[]);
    assert_eq!(sent, vec![upd(top, 0x1000, HOST_LOW)]);

    // One byte more wraps past 2^64: refused before anything is sent.
    let mut t = m.begin(ASID);
    t.add(rw(top, 0x1001, HOST_LOW));
    assert!(matches!(m.commit(t), Err(DmaError::InvalidRange { .. })));
    let mut t = m.begin(ASID);
    t.remove(top, 0x1001);
    assert!(matches!(m.commit(t), Err(DmaError::InvalidRange { .. })));
    let mut t = m.begin(ASID);
    t.add(rw(0, 0x1000, u64::MAX - 0x10));
    assert!(matches!(
        m.commit(t),
        Err(DmaError::InvalidHostRange { .. })
    ));
    let mut t = m.begin(ASID);
    t.add(rw(0, 0, HOST_LOW));
    assert!(matches!(
        m.commit(t),
        Err(DmaError::InvalidRange { size: 0, .. })
    ));
    assert!(m.backend().messages().is_empty());

    // Unmapping the last byte of the space splits the entry.
    let sent = commit(&mut m, &[], &[(u64::MAX, 1)]);
    assert_eq!(sent, vec![inv(top, 0x1000), upd(top, 0xfff, HOST_LOW)]);
}

#[test]
fn backend_error_in_the_middle_of_a_batch_restores_the_previous_state() {
    let mut m = mapper(true);
    let h = 0x10_0000_0000;
    commit(&mut m, &[rw(0, 6 * MIB, h)], &[]);
    let before = m.counters();

    // Plan: BEGIN, INV(0,6M), UPD(0,2M), UPD(4M,2M), UPD(8M,2M), END.
    // The 4th message (second UPDATE) is refused.
    m.backend_mut().fail_nth(4);
    let mut t = m.begin(ASID);
    t.remove(2 * MIB, 2 * MIB);
    t.add(rw(8 * MIB, 2 * MIB, 0x20_0000_0000));
    let err = m.commit(t).unwrap_err();

    match &err {
        DmaError::Backend { message, source } => {
            assert_eq!(*message, upd(4 * MIB, 2 * MIB, h + 4 * MIB));
            assert_eq!(source.errno(), Some(libc::EFAULT));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(m.backend().refused(), &[upd(4 * MIB, 2 * MIB, h + 4 * MIB)]);
    // What the device accepted: the first part, then the compensation
    // (drop what this transaction mapped, re-map what it dropped), then END.
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![
            BEGIN,
            inv(0, 6 * MIB),
            upd(0, 2 * MIB, h),
            inv(0, 2 * MIB),
            upd(0, 6 * MIB, h),
            END
        ]
    );
    assert_eq!(m.mappings(ASID), vec![rw(0, 6 * MIB, h)]);
    assert_in_sync(&m);
    let c = m.counters();
    assert_eq!(c.bytes_mapped, 6 * MIB);
    assert_eq!(c.transactions, before.transactions);
    assert_eq!(c.failed_transactions, before.failed_transactions + 1);

    // The engine still works, and the next diff starts from the old state.
    let sent = commit(&mut m, &[], &[(2 * MIB, 2 * MIB)]);
    assert_eq!(
        sent,
        vec![
            BEGIN,
            inv(0, 6 * MIB),
            upd(0, 2 * MIB, h),
            upd(4 * MIB, 2 * MIB, h + 4 * MIB),
            END
        ]
    );
}

#[test]
fn refused_invalidate_without_batching_re_sends_what_was_invalidated() {
    let mut m = mapper(false);
    for i in 0..3 {
        commit(
            &mut m,
            &[rw(i * 2 * MIB, 2 * MIB, 0x1000_0000 + i * 2 * MIB)],
            &[],
        );
    }
    // INV(0,2M) accepted, INV(4M,2M) refused: the first entry is re-sent.
    m.backend_mut().fail_nth(2);
    let mut t = m.begin(ASID);
    t.remove(0, 2 * MIB);
    t.remove(4 * MIB, 2 * MIB);
    let err = m.commit(t).unwrap_err();
    assert!(
        matches!(err, DmaError::Backend { message, .. } if message == inv(4 * MIB, 2 * MIB)),
        "{err:?}"
    );
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![inv(0, 2 * MIB), upd(0, 2 * MIB, 0x1000_0000)]
    );
    assert_eq!(m.mappings(ASID).len(), 3);
    assert_in_sync(&m);
    assert!(err
        .to_string()
        .contains("INVALIDATE asid 0 iova 0x400000 size 0x200000"));
}

#[test]
fn refused_batch_end_is_rolled_back_and_the_batch_closed() {
    let mut m = mapper(true);
    commit(&mut m, &[rw(0, 2 * MIB, HOST_LOW)], &[]);
    m.backend_mut().fail_nth(4); // BEGIN, INV, UPD, END <- refused
    let mut t = m.begin(ASID);
    t.add(rw(0, 2 * MIB, HOST_HIGH));
    let err = m.commit(t).unwrap_err();
    assert!(
        matches!(err, DmaError::Backend { message: END, .. }),
        "{err:?}"
    );
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![
            BEGIN,
            inv(0, 2 * MIB),
            upd(0, 2 * MIB, HOST_HIGH),
            inv(0, 2 * MIB),
            upd(0, 2 * MIB, HOST_LOW),
            END
        ]
    );
    assert_in_sync(&m);
}

#[test]
fn refused_batch_begin_sends_nothing_else() {
    let mut m = mapper(true);
    m.backend_mut().fail_nth(1);
    let mut t = m.begin(ASID);
    t.add(rw(0, 2 * MIB, HOST_LOW));
    let err = m.commit(t).unwrap_err();
    assert!(
        matches!(err, DmaError::Backend { message: BEGIN, .. }),
        "{err:?}"
    );
    assert!(m.backend().messages().is_empty());
    assert!(m.mappings(ASID).is_empty());
}

#[test]
fn refused_compensation_is_reported_as_rollback_failure() {
    // A backend that accepts `budget` messages and refuses everything after,
    // so the compensation is refused too.
    struct Flaky {
        inner: RecordingBackend,
        budget: usize,
    }
    impl Flaky {
        fn gate(&mut self) -> Result<(), BackendError> {
            if self.budget == 0 {
                return Err(BackendError::Io(std::io::Error::from_raw_os_error(
                    libc::EIO,
                )));
            }
            self.budget -= 1;
            Ok(())
        }
    }
    impl IotlbBackend for Flaky {
        fn batch_begin(&mut self, asid: u32) -> Result<(), BackendError> {
            self.gate()?;
            self.inner.batch_begin(asid)
        }
        fn update(&mut self, asid: u32, range: &DmaRange) -> Result<(), BackendError> {
            self.gate()?;
            self.inner.update(asid, range)
        }
        fn invalidate(&mut self, asid: u32, iova: u64, size: u64) -> Result<(), BackendError> {
            self.gate()?;
            self.inner.invalidate(asid, iova, size)
        }
        fn batch_end(&mut self, asid: u32) -> Result<(), BackendError> {
            self.gate()?;
            self.inner.batch_end(asid)
        }
    }
    let mut m = DmaMapper::new(
        Flaky {
            inner: RecordingBackend::new(),
            budget: 2,
        },
        0..=u64::MAX,
        true,
    );
    let mut t = m.begin(ASID);
    t.add(rw(0, 2 * MIB, HOST_LOW));
    t.add(rw(4 * MIB, 2 * MIB, HOST_HIGH));
    let err = m.commit(t).unwrap_err();
    match err {
        DmaError::RollbackFailed {
            message, rollback, ..
        } => {
            assert_eq!(message, upd(4 * MIB, 2 * MIB, HOST_HIGH));
            assert_eq!(rollback.message, inv(0, 2 * MIB));
            assert_eq!(rollback.error.errno(), Some(libc::EIO));
        }
        other => panic!("unexpected error {other:?}"),
    }
    // The engine keeps describing the state before the transaction.
    assert!(m.mappings(ASID).is_empty());
}

#[test]
fn backend_without_batching_gets_the_same_messages_without_brackets() {
    let mut m = mapper(false);
    assert_eq!(
        boot(&mut m),
        vec![upd(0, 3 * GIB, HOST_LOW), upd(4 * GIB, GIB, HOST_HIGH)]
    );
    let sent = commit(
        &mut m,
        &[rw(PLUG_GPA, 2 * MIB, PLUG_HOST)],
        &[(GIB, 2 * MIB)],
    );
    assert_eq!(
        sent,
        vec![
            inv(0, 3 * GIB),
            upd(0, GIB, HOST_LOW),
            upd(GIB + 2 * MIB, 2 * GIB - 2 * MIB, HOST_LOW + GIB + 2 * MIB),
            upd(PLUG_GPA, 2 * MIB, PLUG_HOST),
        ]
    );
    let c = m.counters();
    assert_eq!((c.batch_begin, c.batch_end), (0, 0));
    let mut t = m.begin(ASID);
    t.add(rw(PLUG_GPA + 2 * MIB, 2 * MIB, PLUG_HOST + 2 * MIB));
    assert_eq!(
        m.commit(t).unwrap(),
        CommitReport {
            updates: 1,
            invalidates: 0,
            batched: false
        }
    );
}

#[test]
fn plug_of_a_single_block() {
    let mut m = mapper(true);
    boot(&mut m);
    let sent = commit(&mut m, &[rw(PLUG_GPA, 128 * MIB, PLUG_HOST)], &[]);
    assert_eq!(sent, vec![BEGIN, upd(PLUG_GPA, 128 * MIB, PLUG_HOST), END]);
    assert_eq!(m.counters().bytes_mapped, 4 * GIB + 128 * MIB);
}

#[test]
fn plug_of_many_adjacent_blocks_is_one_update() {
    let mut m = mapper(true);
    boot(&mut m);
    let blocks: Vec<DmaRange> = (0..4)
        .map(|i| rw(PLUG_GPA + i * 2 * MIB, 2 * MIB, PLUG_HOST + i * 2 * MIB))
        .collect();
    let sent = commit(&mut m, &blocks, &[]);
    assert_eq!(sent, vec![BEGIN, upd(PLUG_GPA, 8 * MIB, PLUG_HOST), END]);
}

#[test]
fn unplug_of_the_middle_part_of_an_entry() {
    let mut m = mapper(true);
    boot(&mut m);
    let blocks: Vec<DmaRange> = (0..4)
        .map(|i| rw(PLUG_GPA + i * 2 * MIB, 2 * MIB, PLUG_HOST + i * 2 * MIB))
        .collect();
    commit(&mut m, &blocks, &[]);

    // Unplug blocks 1 and 2: the entry goes whole, blocks 0 and 3 come back
    // with their own host addresses.
    let sent = commit(
        &mut m,
        &[],
        &[(PLUG_GPA + 2 * MIB, 2 * MIB), (PLUG_GPA + 4 * MIB, 2 * MIB)],
    );
    assert_eq!(
        sent,
        vec![
            BEGIN,
            inv(PLUG_GPA, 8 * MIB),
            upd(PLUG_GPA, 2 * MIB, PLUG_HOST),
            upd(PLUG_GPA + 6 * MIB, 2 * MIB, PLUG_HOST + 6 * MIB),
            END
        ]
    );
    assert_eq!(m.counters().bytes_mapped, 4 * GIB + 4 * MIB);
}

#[test]
fn plug_adjacent_to_an_existing_mapping_is_sent_on_its_own() {
    let mut m = mapper(true);
    boot(&mut m);
    // Host-contiguous with the boot region above 4 GiB, IOVA-adjacent too:
    // still its own entry, the existing one is not rewritten.
    let sent = commit(&mut m, &[rw(5 * GIB, 2 * MIB, HOST_HIGH + GIB)], &[]);
    assert_eq!(
        sent,
        vec![BEGIN, upd(5 * GIB, 2 * MIB, HOST_HIGH + GIB), END]
    );
    // Re-adding the whole span as one range changes nothing either.
    let sent = commit(&mut m, &[rw(4 * GIB, GIB + 2 * MIB, HOST_HIGH)], &[]);
    assert!(sent.is_empty());
}

#[test]
fn interleaved_plug_and_unplug() {
    let mut m = mapper(true);
    boot(&mut m);
    let block = |i: u64| rw(PLUG_GPA + i * 2 * MIB, 2 * MIB, PLUG_HOST + i * 2 * MIB);
    let gpa = |i: u64| PLUG_GPA + i * 2 * MIB;
    let host = |i: u64| PLUG_HOST + i * 2 * MIB;

    assert_eq!(
        commit(&mut m, &[block(0)], &[]),
        vec![BEGIN, upd(gpa(0), 2 * MIB, host(0)), END]
    );
    assert_eq!(
        commit(&mut m, &[block(1)], &[]),
        vec![BEGIN, upd(gpa(1), 2 * MIB, host(1)), END]
    );
    // Block 0 is its own entry: one INVALIDATE, block 1 untouched.
    assert_eq!(
        commit(&mut m, &[], &[(gpa(0), 2 * MIB)]),
        vec![BEGIN, inv(gpa(0), 2 * MIB), END]
    );
    // Plug 2 and 3 while unplugging 1 in the same transaction.
    assert_eq!(
        commit(&mut m, &[block(2), block(3)], &[(gpa(1), 2 * MIB)]),
        vec![
            BEGIN,
            inv(gpa(1), 2 * MIB),
            upd(gpa(2), 4 * MIB, host(2)),
            END
        ]
    );
    // Re-plug 0 and 1, unplug 3 (the tail of the 2..3 entry).
    assert_eq!(
        commit(&mut m, &[block(0), block(1)], &[(gpa(3), 2 * MIB)]),
        vec![
            BEGIN,
            inv(gpa(2), 4 * MIB),
            upd(gpa(0), 6 * MIB, host(0)),
            END
        ]
    );
    assert_eq!(
        m.mappings(ASID),
        vec![
            rw(0, 3 * GIB, HOST_LOW),
            rw(4 * GIB, GIB, HOST_HIGH),
            rw(gpa(0), 6 * MIB, host(0)),
        ]
    );
    let c = m.counters();
    assert_eq!(c.transactions, 6);
    assert_eq!((c.batch_begin, c.batch_end), (6, 6));
    assert_eq!(c.bytes_mapped, 4 * GIB + 6 * MIB);
}

#[test]
fn no_op_transactions_send_nothing_not_even_a_batch() {
    let mut m = mapper(true);
    boot(&mut m);
    // Identical mapping, part of an existing mapping, unmapped remove,
    // add+remove of the same new range, remove then identical re-add.
    let mut t = m.begin(ASID);
    t.add(rw(0, 3 * GIB, HOST_LOW));
    t.add(rw(GIB, MIB, HOST_LOW + GIB));
    t.remove(3 * GIB, GIB);
    t.add(rw(PLUG_GPA, 2 * MIB, PLUG_HOST));
    t.remove(PLUG_GPA, 2 * MIB);
    t.remove(4 * GIB, 2 * MIB);
    t.add(rw(4 * GIB, 2 * MIB, HOST_HIGH));
    let report = m.commit(t).unwrap();
    assert_eq!(report, CommitReport::default());
    assert!(m.backend().messages().is_empty());
    let empty = m.begin(ASID);
    assert!(empty.is_empty());
    assert_eq!(m.commit(empty).unwrap(), CommitReport::default());
    assert!(m.backend().messages().is_empty());
    assert_eq!(m.counters().transactions, 3);
}

#[test]
fn adjacent_whole_entries_share_an_invalidate_only_when_nothing_lies_between() {
    let mut m = mapper(true);
    // Three adjacent entries, each sent on its own.
    for i in 0..3 {
        commit(
            &mut m,
            &[rw(i * 2 * MIB, 2 * MIB, 0x1000_0000 + i * 2 * MIB)],
            &[],
        );
    }
    assert_eq!(m.mappings(ASID).len(), 3);
    // Dropping the outer two: the middle one is in between, two messages.
    let mut t = m.begin(ASID);
    t.remove(0, 2 * MIB);
    t.remove(4 * MIB, 2 * MIB);
    m.commit(t).unwrap();
    assert_in_sync(&m);
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![BEGIN, inv(0, 2 * MIB), inv(4 * MIB, 2 * MIB), END]
    );
    // Put them back (own entries again) and drop the first two: one message.
    commit(&mut m, &[rw(0, 2 * MIB, 0x1000_0000)], &[]);
    commit(&mut m, &[rw(4 * MIB, 2 * MIB, 0x1040_0000)], &[]);
    assert_eq!(
        commit(&mut m, &[], &[(0, 4 * MIB)]),
        vec![BEGIN, inv(0, 4 * MIB), END]
    );
}

#[test]
fn remove_across_two_entries_keeps_both_outer_parts() {
    let mut m = mapper(true);
    commit(&mut m, &[rw(0, 4 * MIB, 0x1000_0000)], &[]);
    commit(&mut m, &[rw(4 * MIB, 4 * MIB, 0x9000_0000)], &[]);
    assert_eq!(
        commit(&mut m, &[], &[(2 * MIB, 4 * MIB)]),
        vec![
            BEGIN,
            inv(0, 8 * MIB),
            upd(0, 2 * MIB, 0x1000_0000),
            upd(6 * MIB, 2 * MIB, 0x9020_0000),
            END
        ]
    );
}

#[test]
fn remapping_to_other_host_memory_replaces_the_entry() {
    let mut m = mapper(true);
    commit(&mut m, &[rw(0, 4 * MIB, 0x1000_0000)], &[]);
    // Same IOVA, other host memory, and a permission change on half.
    let sent = commit(
        &mut m,
        &[
            rw(0, 2 * MIB, 0x2000_0000),
            DmaRange::new(2 * MIB, 2 * MIB, 0x1020_0000, Perm::ReadOnly),
        ],
        &[],
    );
    assert_eq!(
        sent,
        vec![
            BEGIN,
            inv(0, 4 * MIB),
            upd(0, 2 * MIB, 0x2000_0000),
            IotlbMessage::Update {
                asid: ASID,
                range: DmaRange::new(2 * MIB, 2 * MIB, 0x1020_0000, Perm::ReadOnly)
            },
            END
        ]
    );
}

#[test]
fn address_spaces_are_independent() {
    let mut m = mapper(true);
    boot(&mut m);
    let mut t = m.begin(1);
    t.add(rw(0, 2 * MIB, PLUG_HOST));
    m.commit(t).unwrap();
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![
            IotlbMessage::BatchBegin { asid: 1 },
            IotlbMessage::Update {
                asid: 1,
                range: rw(0, 2 * MIB, PLUG_HOST)
            },
            IotlbMessage::BatchEnd { asid: 1 },
        ]
    );
    assert_eq!(m.mappings(1), vec![rw(0, 2 * MIB, PLUG_HOST)]);
    assert_eq!(m.mappings(ASID).len(), 2);
    assert_eq!(m.mappings(1), m.backend().device_iotlb(1));
    assert_eq!(m.counters().bytes_mapped, 4 * GIB + 2 * MIB);
}

/// Random transactions against a page-level model: after every commit the
/// simulated kernel IOTLB must equal the engine's view, no UPDATE may be
/// refused for overlap, and every page must map as the model says.
#[test]
fn random_transactions_match_a_page_model() {
    const PAGE: u64 = 0x1000;
    const PAGES: u64 = 48;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for batching in [true, false] {
        let mut m = mapper(batching);
        let mut model: Vec<Option<(u64, Perm)>> = vec![None; PAGES as usize];
        for _ in 0..400 {
            let mut t = m.begin(ASID);
            for _ in 0..1 + rand(4) {
                let start = rand(PAGES);
                let len = 1 + rand(PAGES - start);
                if rand(3) == 0 {
                    t.remove(start * PAGE, len * PAGE);
                    for p in start..start + len {
                        model[p as usize] = None;
                    }
                } else {
                    // Few host bases, so that contiguity happens often.
                    let host = 0x10_0000 * (1 + rand(2)) + rand(4) * PAGE;
                    let perm = if rand(4) == 0 {
                        Perm::ReadOnly
                    } else {
                        Perm::ReadWrite
                    };
                    t.add(DmaRange::new(start * PAGE, len * PAGE, host, perm));
                    for p in start..start + len {
                        model[p as usize] = Some((host + (p - start) * PAGE, perm));
                    }
                }
            }
            m.commit(t).unwrap();
            assert!(m.backend().refused().is_empty());
            assert_in_sync(&m);
            let mut pages: Vec<Option<(u64, Perm)>> = vec![None; PAGES as usize];
            for r in m.mappings(ASID) {
                for off in (0..r.size).step_by(PAGE as usize) {
                    pages[((r.iova + off) / PAGE) as usize] = Some((r.host_addr + off, r.perm));
                }
            }
            assert_eq!(pages, model);
            let mapped = model.iter().filter(|p| p.is_some()).count() as u64 * PAGE;
            assert_eq!(m.counters().bytes_mapped, mapped);
        }
    }
}

#[test]
fn replay_re_sends_every_entry_in_one_batch_and_keeps_the_state() {
    let mut m = mapper(true);
    boot(&mut m);
    let before = m.mappings(ASID);
    let report = m.replay(ASID).unwrap();
    assert_eq!((report.updates, report.invalidates), (2, 2));
    assert_eq!(
        m.backend_mut().take_messages(),
        vec![
            BEGIN,
            inv(0, 3 * GIB),
            inv(4 * GIB, GIB),
            upd(0, 3 * GIB, HOST_LOW),
            upd(4 * GIB, GIB, HOST_HIGH),
            END
        ]
    );
    assert_eq!(m.mappings(ASID), before);
    assert_in_sync(&m);
}

#[test]
fn replay_of_nothing_sends_nothing() {
    let mut m = mapper(true);
    assert_eq!(m.replay(ASID).unwrap(), CommitReport::default());
    assert!(m.backend_mut().take_messages().is_empty());
}
