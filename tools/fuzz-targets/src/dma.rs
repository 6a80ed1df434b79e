//! The DMA-mapping engine against a byte-granular model of each address
//! space: after every commit, the engine's view and the (recording) device's
//! IOTLB are exactly the model, whether the commit succeeded, was refused
//! before sending anything, or failed in the device and was rolled back.

use std::collections::BTreeMap;

use devices::dma::{DmaError, DmaMapper, DmaRange, Perm, RecordingBackend, Transaction};

use crate::input::Input;

const MAX_OPS: usize = 64;
/// Largest add or remove, in bytes: keeps the byte model small.
const MAX_SIZE: u64 = 48;

/// IOVA byte → (host byte, permission).
type Model = BTreeMap<u64, (u64, Perm)>;

fn expand(ranges: &[DmaRange]) -> Model {
    let mut model = Model::new();
    for r in ranges {
        for i in 0..r.size {
            let old = model.insert(r.iova + i, (r.host_addr + i, r.perm));
            assert!(old.is_none(), "overlapping entries at {:#x}", r.iova + i);
        }
    }
    model
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Add(DmaRange),
    Remove(u64, u64),
}

/// Applies `ops` to `model`; `None` if an op is invalid (empty or wrapping),
/// which the engine must refuse before sending anything.
fn apply(model: &Model, ops: &[Op]) -> Option<Model> {
    let mut model = model.clone();
    for op in ops {
        match *op {
            Op::Add(r) => {
                r.size.checked_sub(1).and_then(|s| r.iova.checked_add(s))?;
                r.size
                    .checked_sub(1)
                    .and_then(|s| r.host_addr.checked_add(s))?;
                for i in 0..r.size {
                    model.insert(r.iova + i, (r.host_addr + i, r.perm));
                }
            }
            Op::Remove(iova, size) => {
                let last = size.checked_sub(1).and_then(|s| iova.checked_add(s))?;
                let doomed: Vec<u64> = model.range(iova..=last).map(|(k, _)| *k).collect();
                for k in doomed {
                    model.remove(&k);
                }
            }
        }
    }
    Some(model)
}

pub fn dma(data: &[u8]) {
    let mut input = Input::new(data);
    let (first, last) = match input.u8() % 4 {
        0 => (0, u64::MAX),
        1 => (0x100, 0x3ff),
        2 => (u64::MAX - 0xfff, u64::MAX),
        _ => (0, 0xfff),
    };
    let batching = input.bool();
    let mut mapper = DmaMapper::new(RecordingBackend::new(), first..=last, batching);
    let mut models: [Model; 2] = Default::default();
    let iovas = [
        0u64,
        0x100,
        0x180,
        0x3f0,
        0xff0,
        u64::MAX - 0x3f,
        u64::MAX - 0xfff,
    ];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let asid = u32::from(input.u8() % 2);
        let mut txn = Transaction::new(asid);
        let mut ops = Vec::new();
        for _ in 0..1 + input.u8() % 6 {
            let iova = input.offset(&iovas);
            let size = match input.u8() % 8 {
                0 => 0,
                // Huge: wraps for any IOVA past the first page, so adds stay
                // cheap to model (a valid huge add would not be).
                1 if iova >= 0x1000 => u64::MAX - 0xff,
                _ => 1 + u64::from(input.u8()) % MAX_SIZE,
            };
            if input.u8().is_multiple_of(3) {
                txn.remove(iova, size);
                ops.push(Op::Remove(iova, size));
            } else {
                // Host addresses: contiguous runs, jumps and the top of memory.
                let host = input.offset(&[0x7f00_0000_0000, 0x7f00_0000_1000, iova]);
                let perm = input.pick(&[Perm::ReadWrite, Perm::ReadOnly, Perm::WriteOnly]);
                let range = DmaRange::new(iova, size, host, perm);
                txn.add(range);
                ops.push(Op::Add(range));
            }
        }
        let fail = input.u8() % 8;
        if fail != 0 && input.bool() {
            // fail_nth counts from 1.
            mapper.backend_mut().fail_nth(usize::from(fail));
        }
        let before = models[asid as usize].clone();
        let sent_before = mapper.backend().messages().len();
        let expected = apply(&before, &ops);
        let result = mapper.commit(txn);
        // A failure armed but not reached must not carry over.
        mapper.backend_mut().fail_nth(usize::MAX);
        let now = match (&result, &expected) {
            (Ok(report), Some(after)) => {
                let outside = after.keys().any(|b| *b < first || *b > last);
                assert!(
                    !outside,
                    "mapped outside the IOVA range {first:#x}..={last:#x}"
                );
                if *after == before {
                    assert_eq!(
                        report.updates + report.invalidates,
                        0,
                        "messages for a transaction that changes nothing"
                    );
                }
                after.clone()
            }
            (Ok(_), None) => panic!("an invalid range was committed: {ops:?}"),
            (Err(DmaError::InvalidRange { .. } | DmaError::InvalidHostRange { .. }), e) => {
                assert!(e.is_none(), "valid ops refused as invalid: {ops:?}");
                assert_eq!(
                    mapper.backend().messages().len(),
                    sent_before,
                    "sent before refusing"
                );
                before
            }
            (Err(DmaError::OutOfIovaRange { .. }), Some(after)) => {
                let outside = after.keys().any(|b| *b < first || *b > last);
                assert!(outside, "refused as out of range: {ops:?}");
                assert_eq!(
                    mapper.backend().messages().len(),
                    sent_before,
                    "sent before refusing"
                );
                before
            }
            (Err(DmaError::OutOfIovaRange { .. }), None) => panic!("invalid ops: {ops:?}"),
            (Err(DmaError::Backend { .. }), _) => before,
            (Err(e @ DmaError::RollbackFailed { .. }), _) => {
                panic!("one refused message must be undone cleanly: {e}")
            }
        };
        models[asid as usize] = now;
        for (asid, model) in models.iter().enumerate() {
            let asid = asid as u32;
            assert_eq!(
                &expand(&mapper.mappings(asid)),
                model,
                "engine view of asid {asid}"
            );
            assert_eq!(
                &expand(&mapper.backend().device_iotlb(asid)),
                model,
                "device IOTLB of asid {asid}"
            );
        }
        assert!(!mapper.backend().in_batch(), "a batch left open");
    }
}
