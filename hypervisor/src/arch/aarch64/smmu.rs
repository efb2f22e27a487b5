//! SMMU fault reporting on aarch64, polled on the scheduling tick.

use alloc::vec::Vec;

use hypervisor::hv_event;
use hypervisor::machine::Machine;

use super::platform::Aarch64;

/// Reports SMMU faults: the DMA was blocked; the guest keeps running. A
/// device that faults on every word of a transfer would flood the console,
/// so consecutive events of one stream and kind are reported once, with
/// their first address and a count.
pub fn poll_smmu(m: &mut Machine<Aarch64>) {
    let Some(smmu) = m.arch.smmu.as_mut() else { return };
    let mut events: Vec<(iommu::Event, u64)> = Vec::new();
    let polled = smmu.poll_events(|e| match events.last_mut() {
        Some((last, n)) if last.stream_id == e.stream_id && last.kind == e.kind => *n += 1,
        _ => events.push((e, 1)),
    });
    if polled.is_err() {
        return;
    }
    for (e, count) in events {
        let vmid = smmu.assignment(e.stream_id).map(|a| a.vmid);
        let guest = m.partitions.iter().find(|p| Some(p.vmid) == vmid).map_or(0, |p| p.info.id);
        hv_event!(
            "fault",
            kind = "smmu",
            guest = guest,
            addr = format_args!("{:#x}", e.address()),
            stream = format_args!("{:#x}", e.stream_id),
            event = e.kind.name(),
            count = count,
        );
    }
}
