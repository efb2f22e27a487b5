//! The aarch64 policy, as pure logic the image's EL2 code applies: the
//! virtual GICv3 each partition sees ([`vgic`]) and the ID registers a
//! guest reads ([`id_regs`]). Everything here takes guest-controlled
//! values and is host-tested.

pub mod id_regs;
pub mod vgic;
