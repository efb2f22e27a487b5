//! Image slots: where hypervisor images run. Each architecture has two
//! fixed slots ([`SLOT_SIZE`] bytes each, `slot_bases.rs`); an image is
//! linked for one of them (`HV_SLOT` at build time). Both are reserved at
//! every boot, like scratch, so a live update stages the new image in the
//! slot the running image does not use, while the guests run, and the
//! running image's bytes stay intact until the new one has taken over
//! (`shared/DESIGN.md` §5).
//!
//! Why two link addresses rather than a relocatable image: the images are
//! not position-independent (x86_64's 32-bit multiboot entry uses absolute
//! addresses), nothing has to be relocated in the brownout or at entry, and
//! an image built for either slot is still accepted: one linked for the
//! running slot takes the old path (copied over the running image during
//! the blackout), so images from before the slots keep working.

use loader::PhysRange;

include!("slot_bases.rs");

/// An architecture's two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub bases: [u64; 2],
    pub size: u64,
}

pub const AARCH64: Slots = Slots { bases: AARCH64_SLOT_BASES, size: SLOT_SIZE };
pub const X86_64: Slots = Slots { bases: X86_64_SLOT_BASES, size: SLOT_SIZE };

/// Where a new image goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Into the other slot, before the freeze: nothing is copied during
    /// the blackout and the running image stays intact.
    Alternate { slot: usize, range: PhysRange },
    /// Over the running image, during the blackout (an image linked for
    /// the running slot).
    InPlace,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Self::Alternate { .. } => "slot",
            Self::InPlace => "in-place",
        }
    }
}

/// Why an image cannot be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotError {
    /// Linked at an address that is no slot's base.
    NotASlot { base: u64 },
    /// Its footprint (file, bss, stacks) exceeds a slot.
    LargerThanSlot { footprint: u64, size: u64 },
}

impl SlotError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotASlot { .. } => "image-not-linked-for-a-slot",
            Self::LargerThanSlot { .. } => "image-larger-than-slot",
        }
    }
}

impl Slots {
    /// The slot whose base is `base`.
    pub fn slot_of(&self, base: u64) -> Option<usize> {
        self.bases.iter().position(|&b| b == base)
    }

    pub fn range(&self, slot: usize) -> PhysRange {
        PhysRange::new(self.bases[slot & 1], self.size)
    }

    /// Both slots, for the boot-time reservation.
    pub fn ranges(&self) -> [PhysRange; 2] {
        [self.range(0), self.range(1)]
    }

    /// Where an image linked at `image_base`, `footprint` bytes in all,
    /// goes while the image at `running_base` runs.
    pub fn place(&self, running_base: u64, image_base: u64, footprint: u64) -> Result<Placement, SlotError> {
        let slot = self.slot_of(image_base).ok_or(SlotError::NotASlot { base: image_base })?;
        if footprint > self.size {
            return Err(SlotError::LargerThanSlot { footprint, size: self.size });
        }
        if image_base == running_base {
            return Ok(Placement::InPlace);
        }
        Ok(Placement::Alternate { slot, range: self.range(slot) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_slot_is_used_and_the_running_one_is_in_place() {
        let s = AARCH64;
        let [a, b] = s.bases;
        assert_eq!(s.place(a, b, 1 << 20), Ok(Placement::Alternate { slot: 1, range: PhysRange::new(b, SLOT_SIZE) }));
        assert_eq!(s.place(b, a, 1 << 20), Ok(Placement::Alternate { slot: 0, range: PhysRange::new(a, SLOT_SIZE) }));
        assert_eq!(s.place(a, a, 1 << 20), Ok(Placement::InPlace));
        assert_eq!(s.place(a, b, SLOT_SIZE), Ok(Placement::Alternate { slot: 1, range: s.range(1) }));
        assert_eq!(
            s.place(a, b, SLOT_SIZE + 1),
            Err(SlotError::LargerThanSlot { footprint: SLOT_SIZE + 1, size: SLOT_SIZE })
        );
        assert_eq!(s.place(a, a + 0x1000, 1), Err(SlotError::NotASlot { base: a + 0x1000 }));
        assert_eq!(SlotError::NotASlot { base: 0 }.reason(), "image-not-linked-for-a-slot");
        assert_eq!(Placement::InPlace.name(), "in-place");
    }

    #[test]
    fn slots_do_not_overlap_and_follow_each_other() {
        for s in [AARCH64, X86_64] {
            let [r0, r1] = s.ranges();
            assert!(!r0.overlaps(&r1));
            assert_eq!(r0.end(), Some(r1.base), "slot 1 follows slot 0");
            assert_eq!(s.slot_of(r1.base), Some(1));
            assert_eq!(s.slot_of(r1.base + 1), None);
        }
    }
}
