//! Starting as an EFI application (issue 21; UEFI 2.10): the same image
//! that QEMU's `-kernel` boots with a DTB also carries a PE32+ header
//! (`entry.S`), and firmware starts it at EL2 with its own MMU on.
//!
//! `efi_pe_entry` (`entry.S`) moves the image to its link address and
//! calls [`hv_efi_main`] there, still under the firmware. It gathers what
//! the hypervisor needs of the firmware into the UEFI boot record
//! (`loader::uefi`, `kho/ABI.md` §8): the command line (the load options),
//! the RSDP, the PCI root bridge's 32-bit window, and the final memory
//! map. Before it leaves boot services it claims, as loader data, every
//! range the hypervisor will use that it did not get from the firmware:
//! both image slots, the manifest and the guest images it names (QEMU's
//! `-device loader` wrote them into RAM the firmware knows nothing of), so
//! a range the firmware uses is refused with a message instead of being
//! overwritten. It reads the record back exactly as the boot path will
//! (memory map and ACPI platform), so a machine the hypervisor cannot run
//! on is refused while the firmware can still print why. Then
//! `ExitBootServices` (retried with a fresh map key if the map changed),
//! the caches cleaned for what is read with the MMU off, and
//! `efi_leave_firmware` enters the ordinary boot path with the record in
//! x0 in place of a DTB. From there on nothing calls the firmware again;
//! a live update hands the same record to the next image.

use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::ffi::c_void;
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering};

use hypervisor::live_update::rollback::{self, Break};

use loader::acpi::PhysMemory;
use loader::dtb::DtbPlatform;
use loader::uefi::{self, UefiError};
use loader::{BootInfo, PhysRange};
use uefi_raw::protocol::file_system::{FileAttribute, FileMode, FileProtocolV1, SimpleFileSystemProtocol};
use uefi_raw::protocol::loaded_image::LoadedImageProtocol;
use uefi_raw::protocol::pci::root_bridge::PciRootBridgeIoProtocol;
use uefi_raw::table::boot::{AllocateType, BootServices, MemoryType};
use uefi_raw::table::system::SystemTable;
use uefi_raw::{guid, Guid, Handle, Status};

// entry.S reads these two fields by offset before it can run Rust.
const _: () = assert!(core::mem::offset_of!(SystemTable, boot_services) == 0x60);
const _: () = assert!(core::mem::offset_of!(BootServices, allocate_pages) == 0x28);

/// `EFI_ACPI_20_TABLE_GUID` (UEFI 2.10 §4.6.1.1).
const ACPI_20_TABLE: Guid = guid!("8868e871-e4f1-11d3-bc22-0080c73c8881");
const PAGE: u64 = 4096;
/// How often `ExitBootServices` is retried with a fresh map (its key goes
/// stale if the firmware changed the map meanwhile, UEFI 2.10 §7.4.6).
const EXIT_ATTEMPTS: usize = 4;
/// Descriptors of slack in the record for the map growing between sizing
/// it and reading it (the record's own allocation splits a descriptor).
const MAP_SLACK: usize = 16;

/// How many `ExitBootServices` calls the EFI entry made (u32::MAX: this
/// image was not started by firmware). In .data, which the boot path
/// does not clear, so the first boot can report it.
static EXIT_ATTEMPTS_MADE: AtomicU32 = AtomicU32::new(u32::MAX);

/// [`EXIT_ATTEMPTS_MADE`], if this image was started by UEFI firmware.
pub fn exit_attempts() -> Option<u32> {
    Some(EXIT_ATTEMPTS_MADE.load(Ordering::Relaxed)).filter(|&n| n != u32::MAX)
}

extern "C" {
    /// `kexec.S`: MMU and caches off, then the image's entry with x0 = the
    /// record.
    fn efi_leave_firmware(record: u64) -> !;
}

/// Why the image gives up under the firmware (printed, then the firmware
/// gets `EFI_LOAD_ERROR` and goes on to its next boot option).
#[derive(Debug)]
enum EfiError {
    NotASystemTable,
    /// The firmware started the image below EL2 (CurrentEL.EL).
    NotAtEl2(u64),
    LoadOptions(Status),
    BadLoadOptions,
    /// A range the hypervisor needs is not free (`what`, the range, the
    /// firmware's status).
    Claim {
        what: &'static str,
        range: PhysRange,
        status: Status,
    },
    Manifest(loader::manifest::ManifestError),
    /// The manifest on the EFI system partition names a file that cannot
    /// be read, or is not a manifest.
    EspManifest(loader::manifest::ResolveError<EspError>),
    MemoryMap(Status),
    Record(UefiError),
    ExitBootServices(Status),
}

impl core::fmt::Display for EfiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotASystemTable => f.write_str("not-an-efi-system-table"),
            Self::NotAtEl2(el) => write!(f, "not-started-at-el2 el={el}"),
            Self::LoadOptions(s) => write!(f, "load-options status={s:?}"),
            Self::BadLoadOptions => f.write_str("load-options-not-ascii"),
            Self::Claim { what, range, status } => {
                write!(f, "{what}-not-free base={:#x} size={:#x} status={status:?}", range.base, range.size)
            }
            Self::Manifest(e) => write!(f, "bad-manifest: {e}"),
            Self::EspManifest(e) => write!(f, "esp-manifest: {e}"),
            Self::MemoryMap(s) => write!(f, "memory-map status={s:?}"),
            Self::Record(e) => write!(f, "firmware-description: {e}"),
            Self::ExitBootServices(s) => write!(f, "exit-boot-services status={s:?}"),
        }
    }
}

/// The firmware while boot services last.
struct Firmware {
    image: Handle,
    st: *const SystemTable,
    bs: *const BootServices,
}

/// Text to the firmware's console (`ConOut`, UCS-2).
struct ConOut<'a>(&'a Firmware);

impl Write for ConOut<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let mut buf = [0u16; 65];
        let mut n = 0;
        let flush = |buf: &mut [u16; 65], n: &mut usize| {
            buf[*n] = 0;
            // SAFETY: ConOut is the system table's (checked by `Firmware::new`),
            // `buf` is NUL-terminated UCS-2; boot services are up.
            unsafe {
                let out = (*self.0.st).stdout;
                if !out.is_null() {
                    // A console that fails to print is not a reason to stop.
                    let _ = ((*out).output_string)(out, buf.as_ptr());
                }
            }
            *n = 0;
        };
        for c in s.chars() {
            if c == '\n' {
                buf[n] = u16::from(b'\r');
                n += 1;
            }
            buf[n] = if (c as u32) < 0x7f { c as u16 } else { u16::from(b'?') };
            n += 1;
            if n >= 63 {
                flush(&mut buf, &mut n);
            }
        }
        if n > 0 {
            flush(&mut buf, &mut n);
        }
        Ok(())
    }
}

impl Firmware {
    /// # Safety
    /// `st` is what the firmware passed to the image's entry point.
    unsafe fn new(image: Handle, st: *const SystemTable) -> Result<Self, EfiError> {
        // SAFETY: the caller's: `st` is the firmware's system table.
        let sig_ok = !st.is_null() && unsafe { (*st).header.signature } == SystemTable::SIGNATURE;
        // SAFETY: as above; a valid system table has boot services until
        // ExitBootServices.
        if !sig_ok || unsafe { (*st).boot_services.is_null() } {
            return Err(EfiError::NotASystemTable);
        }
        // SAFETY: checked just above.
        Ok(Self { image, st, bs: unsafe { (*st).boot_services } })
    }

    fn print(&self, args: core::fmt::Arguments<'_>) {
        let _ = ConOut(self).write_fmt(args);
    }

    /// This image's loaded-image protocol.
    fn loaded_image(&self) -> Result<&LoadedImageProtocol, EfiError> {
        let mut lip: *mut c_void = core::ptr::null_mut();
        // SAFETY: boot services are up; the out pointer is a local.
        let status = unsafe { ((*self.bs).handle_protocol)(self.image, &LoadedImageProtocol::GUID, &raw mut lip) };
        if status != Status::SUCCESS || lip.is_null() {
            return Err(EfiError::LoadOptions(status));
        }
        // SAFETY: the firmware's loaded-image protocol of this image, valid
        // while boot services last.
        Ok(unsafe { &*lip.cast::<LoadedImageProtocol>() })
    }

    /// The load options (the command line) as ASCII, up to a NUL.
    fn cmdline(&self) -> Result<String, EfiError> {
        let lip = self.loaded_image()?;
        let units = lip.load_options_size as usize / 2;
        if lip.load_options.is_null() || units == 0 {
            return Ok(String::new());
        }
        // SAFETY: `load_options_size` bytes at `load_options`, from the
        // firmware, read before anything could free them (as bytes: the
        // firmware promises no alignment).
        let bytes = unsafe { core::slice::from_raw_parts(lip.load_options.cast::<u8>(), units * 2) };
        let text = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        let mut s = String::new();
        for u in text.take_while(|&u| u != 0).take(uefi::MAX_CMDLINE_LEN) {
            let c = u8::try_from(u).ok().filter(|c| (0x20..0x7f).contains(c)).ok_or(EfiError::BadLoadOptions)?;
            s.push(char::from(c));
        }
        Ok(String::from(s.trim()))
    }

    /// The RSDP from the configuration table, if the firmware has ACPI.
    fn rsdp(&self) -> u64 {
        // SAFETY: the system table's configuration table, as many entries
        // as it says.
        let tables = unsafe {
            let st = &*self.st;
            if st.configuration_table.is_null() {
                return 0;
            }
            core::slice::from_raw_parts(st.configuration_table, st.number_of_configuration_table_entries)
        };
        tables.iter().find(|t| t.vendor_guid == ACPI_20_TABLE).map_or(0, |t| t.vendor_table as u64)
    }

    /// The first PCI root bridge's 32-bit memory window, as the firmware
    /// set it up: ACPI QWORD address space descriptors (ACPI 6.5
    /// §6.4.3.5.1) from `Configuration` (UEFI PI / UEFI 2.10 §14.2).
    fn pci_window(&self) -> Option<uefi::PciWindow> {
        let mut proto: *mut c_void = core::ptr::null_mut();
        // SAFETY: boot services are up; the out pointer is a local.
        let status =
            unsafe { ((*self.bs).locate_protocol)(&PciRootBridgeIoProtocol::GUID, core::ptr::null(), &raw mut proto) };
        if status != Status::SUCCESS || proto.is_null() {
            return None;
        }
        let proto = proto.cast::<PciRootBridgeIoProtocol>();
        let mut resources: *const c_void = core::ptr::null();
        // SAFETY: the firmware's protocol instance; `resources` is a local.
        let status = unsafe { ((*proto).configuration)(proto, &raw mut resources) };
        if status != Status::SUCCESS || resources.is_null() {
            return None;
        }
        // The list's extent: QWORD descriptors (3 + length bytes) up to the
        // End tag (2 bytes); loader::uefi reads them.
        let start = resources.cast::<u8>();
        let mut len = 0usize;
        for _ in 0..uefi::MAX_PCI_RESOURCES {
            // SAFETY: a descriptor list the firmware built: each header is
            // inside it, and the walk stops at the End tag or anything else.
            let (tag, body) =
                unsafe { (*start.add(len), u16::from_le_bytes([*start.add(len + 1), *start.add(len + 2)])) };
            match tag {
                uefi::QWORD_TAG => len += 3 + usize::from(body),
                uefi::END_TAG => {
                    len += 2;
                    break;
                }
                _ => return None,
            }
        }
        // SAFETY: the descriptors just walked, `len` bytes.
        uefi::pci_window(unsafe { core::slice::from_raw_parts(start, len) })
    }

    /// `pages` pages of loader data from the firmware: at `at`
    /// (AllocateAddress), or wherever it chooses.
    fn allocate(&self, at: Option<u64>, pages: usize) -> Result<u64, Status> {
        let (kind, mut addr) = match at {
            Some(a) => (AllocateType::ADDRESS, a),
            None => (AllocateType::ANY_PAGES, 0),
        };
        // SAFETY: boot services are up; `addr` is a local.
        let status = unsafe { ((*self.bs).allocate_pages)(kind, MemoryType::LOADER_DATA, pages, &raw mut addr) };
        if status == Status::SUCCESS {
            Ok(addr)
        } else {
            Err(status)
        }
    }

    /// [`Self::allocate`] anywhere, zeroed, as bytes.
    fn allocate_zeroed(&self, pages: usize) -> Result<&'static mut [u8], Status> {
        let at = self.allocate(None, pages)?;
        // SAFETY: `pages` pages just allocated for this image, identity-mapped
        // by the firmware; nothing else refers to them.
        let bytes = unsafe { core::slice::from_raw_parts_mut(at as *mut u8, pages * PAGE as usize) };
        bytes.fill(0);
        Ok(bytes)
    }

    /// Claims `[base, base + size)` (rounded out to pages) as loader data.
    fn claim(&self, what: &'static str, range: PhysRange) -> Result<(), EfiError> {
        let base = range.base & !(PAGE - 1);
        let Some(end) = range.end().and_then(|e| e.checked_next_multiple_of(PAGE)) else {
            return Err(EfiError::Claim { what, range, status: Status::INVALID_PARAMETER });
        };
        let pages = ((end - base) / PAGE) as usize;
        if pages == 0 {
            return Ok(());
        }
        self.allocate(Some(base), pages).map(drop).map_err(|status| EfiError::Claim {
            what,
            range: PhysRange::new(base, end - base),
            status,
        })
    }
}

/// The manifest's name on the EFI system partition, beside the image.
const ESP_MANIFEST: &str = "hvmanifest.txt";
/// Most device-path nodes read to find the image's file path.
const MAX_PATH_NODES: usize = 32;

/// Why a file on the image's volume could not be read into memory.
#[derive(Debug)]
pub struct EspError(&'static str, Status);

impl core::fmt::Display for EspError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} status={:?}", self.0, self.1)
    }
}

/// The volume and directory the image was loaded from (the EFI system
/// partition, when the firmware's boot manager or shell started it).
struct Esp<'a> {
    fw: &'a Firmware,
    root: *mut FileProtocolV1,
    /// The directory, UCS-2, ending in `\`.
    dir: Vec<u16>,
}

impl Firmware {
    /// The image's volume and directory, if it was loaded from a file
    /// system (not, say, by QEMU's `-kernel`).
    fn esp(&self) -> Option<Esp<'_>> {
        let lip = self.loaded_image().ok()?;
        let mut fs: *mut c_void = core::ptr::null_mut();
        // SAFETY: boot services are up; the out pointer is a local.
        let status =
            unsafe { ((*self.bs).handle_protocol)(lip.device_handle, &SimpleFileSystemProtocol::GUID, &raw mut fs) };
        if status != Status::SUCCESS || fs.is_null() || lip.file_path.is_null() {
            return None;
        }
        // The file path: the payloads of its File Path Media nodes (UEFI
        // 2.10 §10.3.5.4: type 4, subtype 4, NUL-terminated UCS-2), in
        // order, up to the End node (type 0x7f).
        let mut path: Vec<u16> = Vec::new();
        let mut node = lip.file_path.cast::<u8>();
        for _ in 0..MAX_PATH_NODES {
            // SAFETY: a device path the firmware built: 4-byte node headers
            // with their lengths, ended by an End node.
            let (kind, sub, len) = unsafe { (*node, *node.add(1), u16::from_le_bytes([*node.add(2), *node.add(3)])) };
            if kind == 0x7f || len < 4 {
                break;
            }
            if (kind, sub) == (4, 4) {
                // SAFETY: the node's payload, `len - 4` bytes (device path
                // nodes need not be aligned: read as bytes).
                let bytes = unsafe { core::slice::from_raw_parts(node.add(4), usize::from(len) - 4) };
                let units = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
                path.extend(units.take_while(|&u| u != 0));
            }
            // SAFETY: the next node follows this one.
            node = unsafe { node.add(usize::from(len)) };
        }
        let cut = path.iter().rposition(|&u| u == u16::from(b'\\'))?;
        path.truncate(cut + 1);
        let mut root: *mut FileProtocolV1 = core::ptr::null_mut();
        // SAFETY: the volume's file system protocol; `root` is a local.
        let status = unsafe { ((*fs.cast::<SimpleFileSystemProtocol>()).open_volume)(fs.cast(), &raw mut root) };
        (status == Status::SUCCESS && !root.is_null()).then_some(Esp { fw: self, root, dir: path })
    }
}

impl Esp<'_> {
    /// Reads `name` (in the image's directory) into pages of its own
    /// (loader data): where it is and how long.
    fn load(&self, name: &str) -> Result<PhysRange, EspError> {
        let mut path = self.dir.clone();
        path.extend(name.bytes().map(u16::from));
        path.push(0);
        let mut file: *mut FileProtocolV1 = core::ptr::null_mut();
        // SAFETY: the volume's root directory; a NUL-terminated UCS-2 path.
        let status = unsafe {
            ((*self.root).open)(self.root, &raw mut file, path.as_ptr(), FileMode::READ, FileAttribute::empty())
        };
        if status != Status::SUCCESS || file.is_null() {
            return Err(EspError("open", status));
        }
        let result = self.read_all(file);
        // SAFETY: the handle `open` gave; closed once.
        let _ = unsafe { ((*file).close)(file) };
        result
    }

    fn read_all(&self, file: *mut FileProtocolV1) -> Result<PhysRange, EspError> {
        let mut size = 0u64;
        // SAFETY: an open file; position u64::MAX is its end (UEFI 2.10
        // §13.5.1 SetPosition), read back as its size.
        let status = unsafe {
            let s = ((*file).set_position)(file, u64::MAX);
            if s == Status::SUCCESS {
                ((*file).get_position)(file, &raw mut size)
            } else {
                s
            }
        };
        if status != Status::SUCCESS || size == 0 || size > MAX_ESP_FILE {
            return Err(EspError("size", status));
        }
        // SAFETY: as above.
        let status = unsafe { ((*file).set_position)(file, 0) };
        if status != Status::SUCCESS {
            return Err(EspError("seek", status));
        }
        let at = self.fw.allocate(None, size.div_ceil(PAGE) as usize).map_err(|s| EspError("allocate", s))?;
        let mut done = 0u64;
        while done < size {
            let mut n = (size - done) as usize;
            // SAFETY: into the pages just allocated, within `size`.
            let status = unsafe { ((*file).read)(file, &raw mut n, (at + done) as *mut c_void) };
            if status != Status::SUCCESS || n == 0 {
                return Err(EspError("read", status));
            }
            done += n as u64;
        }
        Ok(PhysRange::new(at, size))
    }
}

/// Largest file read from the ESP (a guest kernel or initrd).
const MAX_ESP_FILE: u64 = 256 << 20;

/// Without `manifest=` on the command line, the manifest may be a file
/// beside the image on its volume ([`ESP_MANIFEST`]), naming guest files
/// there (`loader::manifest::resolve_files`): each is read into memory of
/// its own and the manifest rewritten with their addresses. Returns the
/// command line with `manifest=` added and the ranges read (already the
/// image's, so not claimed again), or nothing if there is no such file.
fn esp_manifest(fw: &Firmware, cmdline: &str) -> Result<Option<(String, Vec<PhysRange>)>, EfiError> {
    if loader::manifest::address_from_cmdline(cmdline).is_some() {
        return Ok(None);
    }
    let Some(esp) = fw.esp() else { return Ok(None) };
    let Ok(file) = esp.load(ESP_MANIFEST) else { return Ok(None) };
    let mut ours = Vec::from([file]);
    // SAFETY: the pages `load` just filled, `file.size` bytes.
    let bytes = unsafe { core::slice::from_raw_parts(file.base as *const u8, file.size as usize) };
    let text = core::str::from_utf8(bytes).map_err(|_| EfiError::Manifest(loader::manifest::ManifestError::NotUtf8))?;
    let resolved = loader::manifest::resolve_files(text, |name| {
        let r = esp.load(name)?;
        ours.push(r);
        Ok(r)
    })
    .map_err(EfiError::EspManifest)?;
    let out = fw.allocate_zeroed((resolved.len() + 1).div_ceil(PAGE as usize)).map_err(EfiError::MemoryMap)?;
    out[..resolved.len()].copy_from_slice(resolved.as_bytes());
    let at = out.as_ptr() as u64;
    ours.push(PhysRange::new(at, out.len() as u64));
    fw.print(format_args!("hv: esp-manifest files={} manifest={at:#x}\n", ours.len() - 2));
    let cmdline = if cmdline.is_empty() {
        alloc::format!("manifest={at:#x}")
    } else {
        alloc::format!("{cmdline} manifest={at:#x}")
    };
    Ok(Some((cmdline, ours)))
}

/// The image slots (the part of this image's slot the image itself does
/// not fill), the manifest and every guest image it names.
fn claim_everything(fw: &Firmware, cmdline: &str, ours: &[PhysRange]) -> Result<(), EfiError> {
    let claim = |what, range: PhysRange| {
        if ours.iter().any(|o| o.contains(&range)) {
            return Ok(());
        }
        fw.claim(what, range)
    };
    let image = super::image_range();
    for slot in super::image_slots() {
        if slot.overlaps(&image) {
            let end = image.end().unwrap_or(0).next_multiple_of(PAGE);
            fw.claim("image-slot", PhysRange::new(end, slot.base + slot.size - end))?;
        } else {
            fw.claim("image-slot", slot)?;
        }
    }
    let Some(manifest) = loader::manifest::address_from_cmdline(cmdline) else { return Ok(()) };
    // A page at a time, up to its NUL: the manifest's length is not known
    // before it is read, and unclaimed memory may be the firmware's.
    let mut len = 0usize;
    let mut page = manifest & !(PAGE - 1);
    while len < loader::manifest::MAX_MANIFEST_SIZE {
        claim("manifest", PhysRange::new(page, PAGE))?;
        let from = manifest.max(page);
        let n = (page + PAGE - from) as usize;
        // SAFETY: RAM just claimed, identity-mapped by the firmware.
        let bytes = unsafe { core::slice::from_raw_parts(from as *const u8, n) };
        len += n;
        if bytes.contains(&0) {
            break;
        }
        page += PAGE;
    }
    let len = len.min(loader::manifest::MAX_MANIFEST_SIZE);
    // SAFETY: [manifest, + len) was claimed page by page above.
    let bytes = unsafe { core::slice::from_raw_parts(manifest as *const u8, len) };
    for g in loader::manifest::parse(bytes).map_err(EfiError::Manifest)? {
        claim("guest-image", g.image)?;
        if let Some(initrd) = g.initrd {
            claim("guest-initrd", initrd)?;
        }
    }
    Ok(())
}

/// RAM read through the firmware's identity map or, later, this image's:
/// only inside `ram`.
struct Ram<'a>(&'a [PhysRange]);

impl PhysMemory for Ram<'_> {
    fn bytes(&self, phys: u64, len: usize) -> Option<&[u8]> {
        let want = PhysRange::new(phys, len as u64);
        if want.end().is_none() || !self.0.iter().any(|r| r.contains(&want)) {
            return None;
        }
        // SAFETY: inside RAM the memory map describes, identity-mapped
        // (or read with the MMU off); ACPI tables and the record are never
        // written while the hypervisor runs.
        Some(unsafe { core::slice::from_raw_parts(phys as *const u8, len) })
    }
}

/// Whether `phys` holds a UEFI boot record (its magic): read like the
/// DTB's header, at an address the boot protocol gave.
pub fn is_record(phys: u64) -> bool {
    if phys == 0 || !phys.is_multiple_of(8) {
        return false;
    }
    // SAFETY: x0 at entry is in RAM (the boot protocol's DTB or the record
    // this image's EFI entry wrote); 8 aligned bytes.
    let magic = unsafe { core::ptr::read_volatile(phys as *const [u8; 8]) };
    magic == uefi::MAGIC
}

/// The record at `phys` as long as its header says (bounded by
/// `MAX_RECORD_LEN`; `uefi::read` checks the rest).
fn record_bytes(phys: u64) -> &'static [u8] {
    // SAFETY: the record's header, in RAM (see `is_record`).
    let header = unsafe { core::ptr::read_volatile(phys as *const [u8; uefi::HEADER_LEN]) };
    let total = u32::from_le_bytes([header[16], header[17], header[18], header[19]]) as usize;
    let len = total.clamp(uefi::HEADER_LEN, uefi::MAX_RECORD_LEN);
    // SAFETY: the record's pages were allocated for `total` bytes; a
    // record claiming more than MAX_RECORD_LEN is refused by `read`.
    unsafe { core::slice::from_raw_parts(phys as *const u8, len) }
}

/// What the record at `phys` describes: memory from its map, the platform
/// from ACPI. `phys` is what [`is_record`] accepted.
pub fn describe(phys: u64) -> Result<(BootInfo, DtbPlatform, uefi::MemorySummary), UefiError> {
    let record = uefi::read(record_bytes(phys))?;
    let (info, summary) = uefi::memory(&record, phys)?;
    let platform = uefi::platform(&record, &Ram(&info.ram))?;
    Ok((info, platform, summary))
}

/// Sizes, allocates and fills the record, then leaves boot services.
/// Returns the record's address with boot services gone.
fn record_and_exit(fw: &Firmware, cmdline: &str, rsdp: u64, pci: Option<uefi::PciWindow>) -> Result<u64, EfiError> {
    let bs = fw.bs;
    let (mut size, mut key, mut desc_size, mut desc_version) = (0usize, 0usize, 0usize, 0u32);
    // SAFETY: boot services are up; a null map with size 0 asks for the size.
    let status = unsafe {
        ((*bs).get_memory_map)(
            &raw mut size,
            core::ptr::null_mut(),
            &raw mut key,
            &raw mut desc_size,
            &raw mut desc_version,
        )
    };
    if status != Status::BUFFER_TOO_SMALL || desc_size == 0 {
        return Err(EfiError::MemoryMap(status));
    }
    let map_at = uefi::map_at(cmdline.len());
    let capacity = size.saturating_add(MAP_SLACK.saturating_mul(desc_size));
    let buf =
        fw.allocate_zeroed(map_at.saturating_add(capacity).div_ceil(PAGE as usize)).map_err(EfiError::MemoryMap)?;
    let record = buf.as_ptr() as u64;
    buf[uefi::cmdline_at()..uefi::cmdline_at() + cmdline.len()].copy_from_slice(cmdline.as_bytes());
    let mut last = Status::SUCCESS;
    // A test build may hand the firmware a stale key first.
    let stale = u32::from(rollback::break_mode() == Some(Break::StaleMapKey));
    for attempt in 0..EXIT_ATTEMPTS {
        let mut map_len = buf.len() - map_at;
        // SAFETY: `map_len` bytes of the record from `map_at`, 8-aligned.
        let status = unsafe {
            ((*bs).get_memory_map)(
                &raw mut map_len,
                buf[map_at..].as_mut_ptr().cast(),
                &raw mut key,
                &raw mut desc_size,
                &raw mut desc_version,
            )
        };
        if status != Status::SUCCESS {
            return Err(EfiError::MemoryMap(status));
        }
        let header = uefi::header(cmdline.len(), rsdp, map_len, desc_size as u32, pci);
        buf[..uefi::HEADER_LEN].copy_from_slice(&header);
        // What the boot path will make of it, checked while the firmware
        // can still say why not. Nothing here calls the firmware, so the
        // map key stays good.
        describe(record).map_err(EfiError::Record)?;
        let key = if (attempt as u32) < stale { key.wrapping_add(1) } else { key };
        // SAFETY: the map key just read; this image's handle.
        last = unsafe { ((*bs).exit_boot_services)(fw.image, key) };
        if last == Status::SUCCESS {
            EXIT_ATTEMPTS_MADE.store(attempt as u32 + 1, Ordering::Relaxed);
            return Ok(record);
        }
        if last != Status::INVALID_PARAMETER {
            break;
        }
    }
    Err(EfiError::ExitBootServices(last))
}

/// The EFI entry at the link address (`efi_pe_entry`). Returns only if the
/// hypervisor cannot start, with boot services still up.
#[no_mangle]
extern "efiapi" fn hv_efi_main(image: Handle, st: *const SystemTable, loaded_at: u64) -> Status {
    crate::heap::init();
    // SAFETY: `st` is the system table the firmware passed to the entry.
    let Ok(fw) = (unsafe { Firmware::new(image, st) }) else { return Status::LOAD_ERROR };
    fw.print(format_args!("\nhv: efi-entry loaded_at={loaded_at:#x} image={:#x}\n", super::image_range().base));
    let result = at_el2().and_then(|()| fw.cmdline()).and_then(|cmdline| {
        let (cmdline, ours) = esp_manifest(&fw, &cmdline)?.unwrap_or((cmdline, Vec::new()));
        claim_everything(&fw, &cmdline, &ours)?;
        let rsdp = fw.rsdp();
        let pci = fw.pci_window();
        record_and_exit(&fw, &cmdline, rsdp, pci)
    });
    let record = match result {
        Ok(record) => record,
        Err(e) => {
            fw.print(format_args!("hv: boot-failed firmware=uefi reason={e}\n"));
            return Status::LOAD_ERROR;
        }
    };
    leave(record)
}

/// The hypervisor needs EL2; firmware that keeps it starts applications at
/// EL1 (CurrentEL, Arm ARM C5.2.1: EL in bits [3:2]).
fn at_el2() -> Result<(), EfiError> {
    let el: u64;
    // SAFETY: reading CurrentEL has no side effects.
    unsafe { asm!("mrs {0}, CurrentEL", out(reg) el, options(nomem, nostack)) };
    match (el >> 2) & 3 {
        2 => Ok(()),
        other => Err(EfiError::NotAtEl2(other)),
    }
}

/// Boot services are gone: interrupts masked, what the boot path reads with
/// its MMU off cleaned to the point of coherency (this image, the record,
/// the loader's pages, which hold the manifest and the guest images, and
/// the firmware's ACPI tables), then the boot path.
fn leave(record: u64) -> ! {
    // SAFETY: masks every exception; the firmware's vectors must not run
    // any more.
    unsafe { asm!("msr daifset, #0xf", options(nomem, nostack)) };
    let mut flush: Vec<PhysRange> = Vec::from([super::image_range()]);
    if let Ok(rec) = uefi::read(record_bytes(record)) {
        use uefi::memory_type::{ACPI_NVS, ACPI_RECLAIM, LOADER_CODE, LOADER_DATA};
        flush.push(PhysRange::new(record, rec.len as u64));
        flush.extend(
            rec.descriptors()
                .filter(|d| matches!(d.kind, LOADER_CODE | LOADER_DATA | ACPI_RECLAIM | ACPI_NVS))
                .map(|d| d.range),
        );
    }
    for r in &flush {
        super::live_update::clean_invalidate(r.base, r.end().unwrap_or(r.base));
    }
    // SAFETY: boot services are gone and every line the boot path reads
    // with its MMU off is at the point of coherency; the entry turns the
    // MMU off on this identity-mapped code.
    unsafe { efi_leave_firmware(record) }
}
