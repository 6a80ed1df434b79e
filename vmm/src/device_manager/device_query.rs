//! Questions to devices that are round trips to something outside the VMM
//! (a VDUSE device's userspace process answers VHOST_GET_VRING_BASE), asked
//! on a thread of their own so the API never waits on them for long and
//! never with a device or PCI lock held.
//!
//! The API asks with what it copied under the lock (the device's reader and
//! its active queues), then waits at most a bound. A device that has not
//! answered its last question is not asked again until it does: the API
//! reports it as not answering at once, so questions never pile up.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use devices::virtio::vdpa::VringBaseReader;
use seccompiler::BpfProgram;

/// How long the API waits for a device's answer.
pub const ANSWER_BOUND: Duration = Duration::from_secs(1);

/// Where a device's queue progress comes from.
pub trait QueueStateSource: Send + Sync {
    fn last_avail_idx(&self, queue: u16) -> io::Result<u32>;
}

impl QueueStateSource for VringBaseReader {
    fn last_avail_idx(&self, queue: u16) -> io::Result<u32> {
        VringBaseReader::last_avail_idx(self, queue)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot start the device query thread: {0}")]
    Spawn(io::Error),
}

/// One device, as the API asks it: its source and whether a question to
/// it is still out.
#[derive(Clone)]
pub struct QueriedDevice {
    source: Arc<dyn QueueStateSource>,
    in_flight: Arc<AtomicBool>,
}

impl QueriedDevice {
    pub fn new(source: Arc<dyn QueueStateSource>) -> QueriedDevice {
        QueriedDevice {
            source,
            in_flight: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What a device said about its queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueAnswer {
    /// Per queue asked, in order: its last_avail_idx, or `None` if the
    /// device refused that one.
    Answered(Vec<Option<u32>>),
    /// No answer within the bound, or an earlier question is still out.
    NotAnswering,
}

struct Question {
    device: QueriedDevice,
    queues: Vec<u16>,
    reply: mpsc::SyncSender<Vec<Option<u32>>>,
}

/// The API's end of the device query thread.
pub struct DeviceQueries {
    questions: mpsc::Sender<Question>,
    bound: Duration,
}

impl DeviceQueries {
    /// Starts the query thread under `filter` (if any). Call before the
    /// VMM thread's own filter is on: it forbids creating threads.
    pub fn spawn(filter: Option<BpfProgram>, bound: Duration) -> Result<DeviceQueries, QueryError> {
        let (questions, incoming) = mpsc::channel::<Question>();
        std::thread::Builder::new()
            .name("device-query".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = crate::seccomp::apply(&filter) {
                        // Every later question then goes unanswered.
                        eprintln!("microvm: device queries disabled: {e}");
                        return;
                    }
                }
                for question in incoming {
                    answer(question);
                }
            })
            .map_err(QueryError::Spawn)?;
        Ok(DeviceQueries { questions, bound })
    }

    /// The last_avail_idx of each of `queues` on `device`, waiting at most
    /// the bound. Asks nothing when there is no queue to ask about.
    pub fn queue_progress(&self, device: &QueriedDevice, queues: &[u16]) -> QueueAnswer {
        if queues.is_empty() {
            return QueueAnswer::Answered(Vec::new());
        }
        if device.in_flight.swap(true, Ordering::AcqRel) {
            return QueueAnswer::NotAnswering;
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let question = Question {
            device: device.clone(),
            queues: queues.to_vec(),
            reply,
        };
        if self.questions.send(question).is_err() {
            // The thread is gone: nothing is out.
            device.in_flight.store(false, Ordering::Release);
            return QueueAnswer::NotAnswering;
        }
        match answer.recv_timeout(self.bound) {
            Ok(values) => QueueAnswer::Answered(values),
            Err(_) => QueueAnswer::NotAnswering,
        }
    }
}

fn answer(question: Question) {
    let Question {
        device,
        queues,
        reply,
    } = question;
    let values = queues
        .iter()
        .map(|&q| device.source.last_avail_idx(q).ok())
        .collect();
    // Cleared before replying, so the next question is accepted as soon
    // as this answer can be read.
    device.in_flight.store(false, Ordering::Release);
    // The asker may have stopped waiting; the answer is then dropped.
    let _ = reply.send(values);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Records each question and answers `base + queue`, after waiting for
    /// a go on its gate (when gated).
    struct Recording {
        asked: Mutex<Vec<u16>>,
        gate: Option<Mutex<mpsc::Receiver<()>>>,
        base: u32,
    }

    impl QueueStateSource for Recording {
        fn last_avail_idx(&self, queue: u16) -> io::Result<u32> {
            self.asked.lock().unwrap().push(queue);
            if let Some(gate) = &self.gate {
                gate.lock()
                    .unwrap()
                    .recv()
                    .map_err(|_| io::Error::other("gate closed"))?;
            }
            Ok(self.base + u32::from(queue))
        }
    }

    fn recording(gate: Option<mpsc::Receiver<()>>) -> Arc<Recording> {
        Arc::new(Recording {
            asked: Mutex::new(Vec::new()),
            gate: gate.map(Mutex::new),
            base: 100,
        })
    }

    const BOUND: Duration = Duration::from_millis(200);

    #[test]
    fn an_answering_device_reports_each_queue() {
        let queries = DeviceQueries::spawn(None, BOUND).unwrap();
        let source = recording(None);
        let device = QueriedDevice::new(source.clone());
        assert_eq!(
            queries.queue_progress(&device, &[0, 1]),
            QueueAnswer::Answered(vec![Some(100), Some(101)])
        );
        // A second question is accepted once the first was answered.
        assert_eq!(
            queries.queue_progress(&device, &[1]),
            QueueAnswer::Answered(vec![Some(101)])
        );
        assert_eq!(*source.asked.lock().unwrap(), vec![0, 1, 1]);
    }

    #[test]
    fn a_device_without_active_queues_is_not_asked() {
        let queries = DeviceQueries::spawn(None, BOUND).unwrap();
        let source = recording(None);
        let device = QueriedDevice::new(source.clone());
        assert_eq!(
            queries.queue_progress(&device, &[]),
            QueueAnswer::Answered(Vec::new())
        );
        assert!(source.asked.lock().unwrap().is_empty());
    }

    #[test]
    fn a_wedged_device_is_reported_within_the_bound_and_not_asked_again() {
        let queries = DeviceQueries::spawn(None, BOUND).unwrap();
        let (go, gate) = mpsc::channel();
        let source = recording(Some(gate));
        let device = QueriedDevice::new(source.clone());

        let start = Instant::now();
        assert_eq!(
            queries.queue_progress(&device, &[0, 1]),
            QueueAnswer::NotAnswering
        );
        let waited = start.elapsed();
        assert!(waited >= BOUND, "answered before the bound: {waited:?}");
        assert!(waited < BOUND * 3, "waited {waited:?}");

        // While the first question is out, the next is answered at once
        // and nothing more is queued for the device.
        let start = Instant::now();
        assert_eq!(
            queries.queue_progress(&device, &[0, 1]),
            QueueAnswer::NotAnswering
        );
        assert!(start.elapsed() < BOUND / 2, "{:?}", start.elapsed());
        assert_eq!(*source.asked.lock().unwrap(), vec![0]);

        // The device comes back: the stale answer is dropped, and it is
        // asked afresh.
        go.send(()).unwrap();
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while device.in_flight.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the first question never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        go.send(()).unwrap();
        assert_eq!(
            queries.queue_progress(&device, &[1]),
            QueueAnswer::Answered(vec![Some(101)])
        );
    }

    #[test]
    fn a_device_behind_a_wedged_one_is_still_reported_within_the_bound() {
        let queries = DeviceQueries::spawn(None, BOUND).unwrap();
        let (_go, gate) = mpsc::channel();
        let wedged = QueriedDevice::new(recording(Some(gate)));
        let healthy = QueriedDevice::new(recording(None));
        assert_eq!(
            queries.queue_progress(&wedged, &[0]),
            QueueAnswer::NotAnswering
        );
        // One thread answers in order: the other device waits behind the
        // wedged one, but its asker still gets a report within the bound.
        let start = Instant::now();
        let answer = queries.queue_progress(&healthy, &[0]);
        assert!(start.elapsed() < BOUND * 2, "{:?}", start.elapsed());
        assert_eq!(answer, QueueAnswer::NotAnswering);
    }
}
