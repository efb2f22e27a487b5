//! The aarch64 policy, as pure logic the image's EL2 code applies: what a
//! guest can reach and how each class is handled ([`traps`]), the ID
//! registers it reads ([`id_regs`]), its UART ([`pl011`]), the virtual GICv3 each partition sees
//! ([`vgic`]) and the emulated EL1 physical timer ([`ptimer`]). Everything
//! here takes guest-controlled values and is host-tested.

pub mod id_regs;
pub mod pl011;
pub mod ptimer;
pub mod traps;
pub mod vgic;
