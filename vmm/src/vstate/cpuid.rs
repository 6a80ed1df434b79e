//! The CPUID a vCPU presents: KVM's supported set, with the topology fields
//! that must differ per vCPU and the paravirtual leaves a guest looks for.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
pub const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
pub const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// What the VMM knows about the host that shapes the CPUID it hands out.
#[derive(Clone, Copy, Debug)]
pub struct CpuidOptions {
    pub vcpu_id: u8,
    pub vcpu_count: u8,
    pub tsc_deadline: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error(
        "KVM does not report its paravirtual CPUID leaves (0x40000000); cannot present kvm-clock"
    )]
    NoKvmLeaves,
}

/// Adjusts KVM's supported CPUID for one vCPU.
pub fn patch(cpuid: &mut CpuId, options: CpuidOptions) -> Result<(), CpuidError> {
    let apic_id = u32::from(options.vcpu_id);
    let count = u32::from(options.vcpu_count);
    // Bits needed to number `count` logical CPUs (x2APIC ID shift).
    let core_shift = u32::BITS - (count.max(1) - 1).leading_zeros();
    let mut has_kvm_signature = false;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if options.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                patch_topology(entry, apic_id, count, core_shift);
            }
            LEAF_KVM_SIGNATURE => has_kvm_signature = true,
            _ => {}
        }
    }
    if has_kvm_signature {
        Ok(())
    } else {
        Err(CpuidError::NoKvmLeaves)
    }
}

/// One thread per core, `count` cores in one package.
fn patch_topology(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_shift: u32) {
    entry.edx = apic_id;
    match entry.index {
        0 => {
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
        }
        1 => {
            entry.eax = core_shift;
            entry.ebx = count;
            entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
        }
        _ => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = entry.index;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0000,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_KVM_SIGNATURE, 0),
            entry(LEAF_KVM_FEATURES, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id() {
        let mut cpuid = sample();
        let options = CpuidOptions {
            vcpu_id: 3,
            vcpu_count: 4,
            tsc_deadline: true,
        };
        patch(&mut cpuid, options).unwrap();
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0, "low bits of EBX are kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        let cores = find(&cpuid, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!(cores.edx, 3);
        assert_eq!(cores.ebx, 4);
        assert_eq!(cores.eax, 2, "4 CPUs need 2 bits of APIC ID");
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_deadline_without_kvm_support() {
        let mut cpuid = sample();
        let options = CpuidOptions {
            vcpu_id: 0,
            vcpu_count: 1,
            tsc_deadline: false,
        };
        patch(&mut cpuid, options).unwrap();
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&cpuid, LEAF_EXT_TOPOLOGY, 1).eax, 0);
    }

    #[test]
    fn missing_kvm_leaves_are_an_error() {
        let mut cpuid = CpuId::from_entries(&[entry(LEAF_FEATURES, 0)]).unwrap();
        let options = CpuidOptions {
            vcpu_id: 0,
            vcpu_count: 1,
            tsc_deadline: false,
        };
        assert!(matches!(
            patch(&mut cpuid, options),
            Err(CpuidError::NoKvmLeaves)
        ));
    }
}
