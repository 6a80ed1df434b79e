//! The VM's hardware state on KVM: the VM and its memory slots, vCPUs with
//! their registers and CPUID (and the gate that parks them for a pause),
//! guest memory, and interrupt routing.

pub mod block_slots;
pub mod cpuid;
pub mod interrupts;
pub mod memory;
pub mod regs;
pub mod vcpu;
pub mod vcpu_gate;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
