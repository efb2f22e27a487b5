//! The device tree each guest boots with: RAM, CPUs, timer, GIC, PSCI via
//! `hvc`, a PL011 console and `/chosen` (Linux
//! `Documentation/devicetree/bindings/`: `arm/cpus.yaml`, `timer/arm,arch_timer.yaml`,
//! `interrupt-controller/arm,gic-v3.yaml`, `arm/psci.yaml`, `serial/pl011.yaml`).
//! The guest-physical layout follows QEMU's `virt` machine, so an
//! unmodified kernel finds everything where it expects it.

use alloc::string::String;
use alloc::vec::Vec;

use dtoolkit::model::{DeviceTree, DeviceTreeNode, DeviceTreeProperty};

use crate::partition::GUEST_RAM_BASE;

/// Guest-physical addresses of the emulated devices.
pub const GUEST_GICD: u64 = 0x0800_0000;
pub const GUEST_GICD_SIZE: u64 = 0x1_0000;
pub const GUEST_GICR: u64 = 0x080a_0000;
/// One redistributor frame pair (RD + SGI) per vCPU (GICv3 spec §12.10).
pub const GUEST_GICR_STRIDE: u64 = 0x2_0000;
pub const GUEST_UART: u64 = 0x0900_0000;
pub const GUEST_UART_SIZE: u64 = 0x1000;
/// PPIs of the architected timer, as binding numbers (INTID - 16):
/// secure phys 13, non-secure phys 14, virtual 11, hypervisor 10.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// GIC binding: first cell 0 = SPI, 1 = PPI; third cell 4 = level-high.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_LEVEL_HIGH: u32 = 4;
const INTC_PHANDLE: u32 = 1;
const CLOCK_PHANDLE: u32 = 2;
/// The PL011's interrupt: SPI 1 (INTID 33), as on QEMU `virt`.
pub const GUEST_UART_SPI: u32 = 1;
/// The UART's reference and bus clock (a fixed 24 MHz clock, as on QEMU
/// `virt`; Linux's amba bus needs `apb_pclk` to probe the PL011).
const UART_CLOCK_HZ: u32 = 24_000_000;

/// What goes into a guest's device tree.
#[derive(Clone, Debug)]
pub struct GuestDtbSpec<'a> {
    pub ram_size: u64,
    pub vcpus: u32,
    pub bootargs: &'a str,
    /// Guest-physical range of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
}

/// A property; names here are constants, valid by construction.
macro_rules! prop {
    ($name:expr, $value:expr) => {
        DeviceTreeProperty::new_unchecked(String::from($name), $value)
    };
}

/// A `<u64 base, u64 size>` pair in big-endian cells.
fn reg64(pairs: &[(u64, u64)]) -> Vec<u8> {
    pairs.iter().flat_map(|&(a, s)| a.to_be_bytes().into_iter().chain(s.to_be_bytes())).collect()
}

fn cells(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// A NUL-separated string list (`compatible = "a", "b"`).
fn strings(list: &[&str]) -> Vec<u8> {
    list.iter().flat_map(|s| s.bytes().chain(core::iter::once(0))).collect()
}

fn node(name: &str) -> DeviceTreeNode {
    DeviceTreeNode::new_unchecked(String::from(name))
}

/// Builds the flattened device tree.
pub fn build(spec: &GuestDtbSpec<'_>) -> Vec<u8> {
    let mut tree = DeviceTree::new();
    let root = &mut tree.root;
    root.add_property(prop!("#address-cells", 2u32));
    root.add_property(prop!("#size-cells", 2u32));
    root.add_property(prop!("compatible", "linux,dummy-virt"));
    root.add_property(prop!("model", "hvlu guest"));
    root.add_property(prop!("interrupt-parent", INTC_PHANDLE));

    let mut chosen = node("chosen");
    chosen.add_property(prop!("bootargs", spec.bootargs));
    chosen.add_property(prop!("stdout-path", "/pl011@9000000"));
    if let Some((start, size)) = spec.initrd {
        chosen.add_property(prop!("linux,initrd-start", start));
        chosen.add_property(prop!("linux,initrd-end", start + size));
    }
    root.add_child(chosen);

    let mut memory = node("memory@40000000");
    memory.add_property(prop!("device_type", "memory"));
    memory.add_property(prop!("reg", reg64(&[(GUEST_RAM_BASE, spec.ram_size)])));
    root.add_child(memory);

    let mut cpus = node("cpus");
    cpus.add_property(prop!("#address-cells", 1u32));
    cpus.add_property(prop!("#size-cells", 0u32));
    for i in 0..spec.vcpus {
        let mut cpu = node(&alloc::format!("cpu@{i}"));
        cpu.add_property(prop!("device_type", "cpu"));
        cpu.add_property(prop!("compatible", "arm,armv8"));
        cpu.add_property(prop!("reg", i));
        cpu.add_property(prop!("enable-method", "psci"));
        cpus.add_child(cpu);
    }
    root.add_child(cpus);

    let mut psci = node("psci");
    psci.add_property(prop!("compatible", strings(&["arm,psci-1.0", "arm,psci-0.2"])));
    psci.add_property(prop!("method", "hvc"));
    root.add_child(psci);

    let mut timer = node("timer");
    timer.add_property(prop!("compatible", "arm,armv8-timer"));
    let irqs: Vec<u32> = TIMER_PPIS.iter().flat_map(|&p| [GIC_PPI, p, IRQ_LEVEL_HIGH]).collect();
    timer.add_property(prop!("interrupts", cells(&irqs)));
    timer.add_property(prop!("always-on", Vec::<u8>::new()));
    root.add_child(timer);

    let mut intc = node("intc@8000000");
    intc.add_property(prop!("compatible", "arm,gic-v3"));
    intc.add_property(prop!("#interrupt-cells", 3u32));
    intc.add_property(prop!("interrupt-controller", Vec::<u8>::new()));
    intc.add_property(prop!("phandle", INTC_PHANDLE));
    let gicr_size = GUEST_GICR_STRIDE * u64::from(spec.vcpus);
    intc.add_property(prop!("reg", reg64(&[(GUEST_GICD, GUEST_GICD_SIZE), (GUEST_GICR, gicr_size)])));
    root.add_child(intc);

    let mut clock = node("apb-pclk");
    clock.add_property(prop!("compatible", "fixed-clock"));
    clock.add_property(prop!("#clock-cells", 0u32));
    clock.add_property(prop!("clock-frequency", UART_CLOCK_HZ));
    clock.add_property(prop!("clock-output-names", "clk24mhz"));
    clock.add_property(prop!("phandle", CLOCK_PHANDLE));
    root.add_child(clock);

    let mut uart = node("pl011@9000000");
    uart.add_property(prop!("compatible", strings(&["arm,pl011", "arm,primecell"])));
    uart.add_property(prop!("reg", reg64(&[(GUEST_UART, GUEST_UART_SIZE)])));
    uart.add_property(prop!("interrupts", cells(&[GIC_SPI, GUEST_UART_SPI, IRQ_LEVEL_HIGH])));
    uart.add_property(prop!("clocks", cells(&[CLOCK_PHANDLE, CLOCK_PHANDLE])));
    uart.add_property(prop!("clock-names", strings(&["uartclk", "apb_pclk"])));
    root.add_child(uart);

    tree.to_dtb()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_dtb_parses_back() {
        let blob = build(&GuestDtbSpec {
            ram_size: 16 << 20,
            vcpus: 2,
            bootargs: "ticks=40 console=ttyAMA0",
            initrd: Some((0x4100_0000, 0x1000)),
        });
        let (info, plat) = loader::dtb::parse(&blob, 0x40f0_0000).expect("our own DTB validates");
        assert_eq!(info.ram, [loader::PhysRange::new(GUEST_RAM_BASE, 16 << 20)]);
        assert_eq!(info.cmdline, "ticks=40 console=ttyAMA0");
        assert_eq!(plat.cpus, [0, 1]);
        assert_eq!(plat.psci, Some(loader::dtb::PsciConduit::Hvc));
        assert_eq!(plat.uart.map(|u| u.base), Some(GUEST_UART));
        let gic = plat.gic.expect("gic");
        assert_eq!((gic.distributor.base, gic.redistributors.size), (GUEST_GICD, 2 * GUEST_GICR_STRIDE));
        assert_eq!(info.modules[0].range, loader::PhysRange::new(0x4100_0000, 0x1000));
    }
}
