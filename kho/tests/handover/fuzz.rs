//! A bounded fuzz of the reader, run by every `cargo test`: proptest mutates
//! the golden blobs (bit flips, truncation, overwrites with random bytes and
//! with interesting header words) and the reader must answer every input
//! with a value or a typed error, never a panic. A second target feeds
//! records with valid checksums but arbitrary headers and payloads to the
//! record decoder. Case counts keep the whole file within a few seconds.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

use kho::{HandoverReader, StateRecord};

use crate::fixtures::{self, v1, v2};

const GOLDEN_V1: &[u8] = include_bytes!("../../testdata/handover-v1.dtb");
const GOLDEN_V2: &[u8] = include_bytes!("../../testdata/handover-v2.dtb");

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    Truncate {
        len: usize,
    },
    Overwrite {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A big-endian word at a 4-byte boundary: lengths, offsets, tokens.
    SetWord {
        at: usize,
        word: u32,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let word = prop_oneof![
        Just(0_u32),
        Just(1),
        Just(2),
        Just(3),
        Just(9),
        Just(0x10),
        Just(0xffff),
        Just(u32::MAX),
        Just(0xd00d_feed),
        any::<u32>(),
    ];
    prop_oneof![
        4 => (any::<usize>(), 0_u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        1 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        2 => (any::<usize>(), vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        3 => (any::<usize>(), word).prop_map(|(at, word)| Mutation::SetWord { at, word }),
        1 => (any::<usize>(), vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn apply(blob: &mut Vec<u8>, mutation: &Mutation) {
    if blob.is_empty() {
        return;
    }
    let len = blob.len();
    match mutation {
        Mutation::FlipBit { at, bit } => blob[at % len] ^= 1 << bit,
        Mutation::Truncate { len: new_len } => blob.truncate(new_len % len),
        Mutation::Overwrite { at, bytes } => {
            for (offset, byte) in bytes.iter().enumerate() {
                if let Some(slot) = blob.get_mut(at % len + offset) {
                    *slot = *byte;
                }
            }
        }
        Mutation::SetWord { at, word } => {
            let at = (at % len) & !3;
            for (offset, byte) in word.to_be_bytes().into_iter().enumerate() {
                if let Some(slot) = blob.get_mut(at + offset) {
                    *slot = byte;
                }
            }
        }
        Mutation::Insert { at, bytes } => {
            let at = at % len;
            blob.splice(at..at, bytes.iter().copied());
        }
    }
}

/// Reads `blob` and, if it is accepted, uses everything it exposes.
fn exercise(blob: &[u8]) {
    let Ok(reader) = fixtures::read(blob) else {
        return;
    };
    let _ = HandoverReader::blob_size(reader.blob());
    let _ = reader.preserved_ranges().count();
    let _ = reader.bitmap_roots().len() + reader.scratch().regions().len();
    for node in reader.subsystems() {
        let _ = reader.children(node.path()).count();
        let _ = node.all_pages().count();
        for (name, _) in node.records() {
            let _ = node.record_named::<v1::PartitionRecord>(name);
            let _ = node.record_named::<v2::PartitionRecord>(name);
            let _ = node.record_named::<v1::VcpuRecord>(name);
            let _ = node.record_named::<v2::VcpuRecord>(name);
        }
    }
}

fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: Some(Box::new(FileFailurePersistence::Off)), ..Config::default() }
}

proptest! {
    #![proptest_config(config(6000))]

    #[test]
    fn reader_survives_mutated_goldens(
        use_v2 in any::<bool>(),
        mutations in vec(mutation(), 1..6),
    ) {
        let mut blob = if use_v2 { GOLDEN_V2 } else { GOLDEN_V1 }.to_vec();
        for mutation in &mutations {
            apply(&mut blob, mutation);
        }
        exercise(&blob);
    }

    #[test]
    fn reader_survives_random_bodies_behind_a_valid_header(
        body in vec(any::<u8>(), 0..512),
        use_v2 in any::<bool>(),
    ) {
        // Keep the header (so the FDT parser gets past it) and randomise
        // everything after it, at the golden's length.
        let golden = if use_v2 { GOLDEN_V2 } else { GOLDEN_V1 };
        let mut blob = golden[..40].to_vec();
        blob.extend(body.iter().copied().cycle().take(golden.len() - 40));
        exercise(&blob);
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn record_decoder_survives_checksummed_garbage(
        id in prop_oneof![Just(0x100_u32), Just(0x200), any::<u32>()],
        version in 0_u16..5,
        min_reader_version in 0_u16..5,
        payload in vec(any::<u8>(), 0..64),
    ) {
        let mut record = Vec::with_capacity(16 + payload.len());
        record.extend_from_slice(&id.to_be_bytes());
        record.extend_from_slice(&version.to_be_bytes());
        record.extend_from_slice(&min_reader_version.to_be_bytes());
        record.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        let mut covered = record.clone();
        covered.extend_from_slice(&payload);
        record.extend_from_slice(&kho::crc32(&covered).to_be_bytes());
        record.extend_from_slice(&payload);
        let _ = v1::PartitionRecord::decode(&record);
        let _ = v2::PartitionRecord::decode(&record);
        let _ = v1::VcpuRecord::decode(&record);
        if let Ok(vcpu) = v2::VcpuRecord::decode(&record) {
            // Whatever decodes re-encodes to a record that decodes the same.
            prop_assert_eq!(v2::VcpuRecord::decode(&vcpu.encode()), Ok(vcpu));
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// The writer no longer parses what it wrote before committing to it:
    /// whatever it accepts, the reader accepts, with the same records and
    /// pages where the writer put them.
    #[test]
    fn whatever_the_writer_writes_the_reader_reads_back(
        nodes in vec(("[a-z][a-z0-9-]{0,6}", 0u32..4, vec(any::<u64>(), 0..3), vec(0u64..64, 0..3)), 0..8),
        blob_page in 0u64..4,
    ) {
        let mut writer = fixtures::writer(&fixtures::identity("0.3.0", 3));
        let mut expected = Vec::new();
        for (k, (name, id, pcs, pages)) in nodes.iter().enumerate() {
            let path = format!("{name}/{k}");
            let mut node = writer.subsystem(&path).unwrap();
            for (i, &pc) in pcs.iter().enumerate() {
                let vcpu = v2::VcpuRecord { index: *id, pc, sp: i as u64, pending_interrupt: 0 };
                let name = format!("vcpu-{i}");
                node.add_record_named(&name, &vcpu).unwrap();
                expected.push((path.clone(), name, vcpu));
            }
            // Pages from a window of their own per node, so they never
            // overlap: one page each, some adjacent.
            let ranges: Vec<_> = pages
                .iter()
                .map(|&p| fixtures::range(fixtures::GIB + 0x800_0000 + (k as u64) * 0x10_0000 + p * 0x1000, 0x1000))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !ranges.is_empty() {
                node.add_pages("pages", &ranges).unwrap();
            }
        }
        let mut buffer = vec![0; fixtures::HANDOVER_BUFFER];
        let at = fixtures::HANDOVER_PHYS + 0x40_0000 + blob_page * 0x1_0000;
        let len = writer.write_to(&mut buffer, at).unwrap();
        let reader = HandoverReader::new(&buffer[..len], at, &fixtures::ram()).unwrap();
        for (path, name, vcpu) in &expected {
            let node = reader.subsystem(path).unwrap();
            prop_assert_eq!(node.record_named::<v2::VcpuRecord>(name), Ok(Some(vcpu.clone())));
        }
    }
}
