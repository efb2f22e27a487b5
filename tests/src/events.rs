//! Parser for the serial event protocol (`shared/DESIGN.md` §7):
//! `hv: <event> key=value ...` and `guest<N>: <event> key=value ...`.
//! Other lines are human-readable text and are skipped.

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Hypervisor,
    Guest(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub source: Source,
    pub name: String,
    pub fields: BTreeMap<String, String>,
}

impl Event {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A numeric field (decimal, or hex with `0x`).
    pub fn num(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

/// Parses one line; `None` for lines that are not events.
pub fn parse_line(line: &str) -> Option<Event> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (prefix, rest) = line.split_once(": ")?;
    let source =
        if prefix == "hv" { Source::Hypervisor } else { Source::Guest(prefix.strip_prefix("guest")?.parse().ok()?) };
    let mut words = rest.split(' ');
    let name = words.next().filter(|n| !n.is_empty() && !n.contains('='))?;
    let mut fields = BTreeMap::new();
    for w in words {
        let (k, v) = w.split_once('=')?;
        if k.is_empty() {
            return None;
        }
        fields.insert(k.to_string(), v.to_string());
    }
    Some(Event { source, name: name.to_string(), fields })
}

/// All events in a serial log, in order.
pub fn parse_log(log: &str) -> Vec<Event> {
    log.lines().filter_map(parse_line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_event() {
        let e = parse_line("hv: boot arch=aarch64 version=0.1.0 build=abc cpus=2 mem_mib=512\r").unwrap();
        assert_eq!(e.source, Source::Hypervisor);
        assert_eq!(e.name, "boot");
        assert_eq!(e.get("arch"), Some("aarch64"));
        assert_eq!(e.num("cpus"), Some(2));
        assert_eq!(e.num("mem_mib"), Some(512));
    }

    #[test]
    fn guest_event_and_hex() {
        let e = parse_line("guest3: fault addr=0x4000 ok=1").unwrap();
        assert_eq!(e.source, Source::Guest(3));
        assert_eq!(e.num("addr"), Some(0x4000));
    }

    #[test]
    fn text_lines_are_not_events() {
        assert!(parse_line("hypervisor 0.1.0 (dev) starting at EL2").is_none());
        assert!(parse_line("hv: this is prose, not an event").is_none());
        assert!(parse_line("guestX: alive ticks=1").is_none());
        assert!(parse_line("").is_none());
        let log = "junk\nhv: shutdown status=ok\nmore junk\n";
        assert_eq!(parse_log(log).len(), 1);
    }
}
