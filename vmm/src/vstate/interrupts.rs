//! Guest interrupt plumbing in KVM: GSI routing for MSI vectors (kept in
//! sync with what the guest programs) and ioeventfds for notifications.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::interrupt::{MsiMessage, MsiRouter, MsiVector};
use devices::virtio::pci::IoEventRegistry;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The in-kernel IOAPIC has 24 pins; GSIs above are free for MSI.
const IOAPIC_PINS: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot connect GSI {gsi} to an irqfd: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot set the initial interrupt routing: {0}")]
    Routing(io::Error),
}

/// KVM's GSI routing table: the IOAPIC pins, plus one MSI route per
/// unmasked vector. KVM replaces the whole table on every update, so the
/// full table is kept here.
pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
    msi_routes: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: Mutex<u32>,
}

impl KvmMsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Result<Arc<KvmMsiRouter>, InterruptError> {
        let router = Arc::new(KvmMsiRouter {
            vm,
            msi_routes: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
        });
        let routes = router.msi_routes.lock().unwrap_or_else(|p| p.into_inner());
        router.apply(&routes).map_err(InterruptError::Routing)?;
        drop(routes);
        Ok(router)
    }

    /// `count` vectors, each an irqfd on a fresh GSI with no route yet.
    pub fn allocate_vectors(&self, count: usize) -> Result<Vec<MsiVector>, InterruptError> {
        let mut vectors = Vec::with_capacity(count);
        for _ in 0..count {
            let gsi = {
                let mut next = self.next_gsi.lock().unwrap_or_else(|p| p.into_inner());
                let gsi = *next;
                *next += 1;
                gsi
            };
            let event = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            self.vm
                .register_irqfd(&event, gsi)
                .map_err(|source| InterruptError::Irqfd { gsi, source })?;
            vectors.push(MsiVector { gsi, event });
        }
        Ok(vectors)
    }

    fn apply(&self, msi_routes: &BTreeMap<u32, MsiMessage>) -> io::Result<()> {
        let mut entries: Vec<kvm_irq_routing_entry> = (0..IOAPIC_PINS)
            .map(|pin| kvm_irq_routing_entry {
                gsi: pin,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip {
                        irqchip: KVM_IRQCHIP_IOAPIC,
                        pin,
                    },
                },
                ..Default::default()
            })
            .collect();
        entries.extend(
            msi_routes
                .iter()
                .map(|(&gsi, message)| kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: message.address as u32,
                            address_hi: (message.address >> 32) as u32,
                            data: message.data,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                }),
        );
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl MsiRouter for KvmMsiRouter {
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match message {
            Some(message) => routes.insert(gsi, message) != Some(message),
            None => routes.remove(&gsi).is_some(),
        };
        if changed {
            self.apply(&routes)?;
        }
        Ok(())
    }
}

/// Registers KVM ioeventfds for MMIO writes of any length.
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl KvmIoEvents {
    pub fn new(vm: Arc<VmFd>) -> Arc<KvmIoEvents> {
        Arc::new(KvmIoEvents { vm })
    }
}

impl IoEventRegistry for KvmIoEvents {
    fn register(&self, addr: u64, event: &EventFd) -> io::Result<()> {
        self.vm
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, event: &EventFd) -> io::Result<()> {
        self.vm
            .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}
