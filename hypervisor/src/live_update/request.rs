//! Checking an update request before anything changes: the image's
//! descriptor against the running image (arch, handover ABI, size,
//! checksum) and the room to stage it.

use core::fmt;

use loader::image_desc::{self, Descriptor, ImageArch, ImageError};

/// Why an update request is refused before anything changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    Image(ImageError),
    /// The image does not fit the scratch staging area.
    NoScratch,
}

impl RequestError {
    /// Token for `hv: update-refused reason=...`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Image(e) => e.reason(),
            Self::NoScratch => "no-scratch",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image(e) => write!(f, "{e}"),
            Self::NoScratch => write!(f, "no scratch region to stage the image in"),
        }
    }
}

/// Checks a new image (copied out of guest memory) against what is running.
pub fn check_request(image: &[u8], arch: ImageArch, staging_bytes: u64) -> Result<Descriptor, RequestError> {
    if staging_bytes == 0 {
        return Err(RequestError::NoScratch);
    }
    image_desc::validate(image, arch, crate::HANDOVER_ABI_MAX, staging_bytes).map_err(RequestError::Image)
}

/// The blackout in microseconds between two counter values.
pub fn blackout_us(start: u64, end: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    (u128::from(end.wrapping_sub(start)) * 1_000_000 / u128::from(hz)) as u64
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn blackout_arithmetic() {
        assert_eq!(blackout_us(1000, 63_500, 62_500_000), 1000);
        assert_eq!(blackout_us(u64::MAX - 10, 52, 1_000_000), 63);
        assert_eq!(blackout_us(0, 100, 0), 0);
    }

    #[test]
    fn request_refuses_bad_images() {
        let mut img = std::vec![0u8; 8192];
        img[64..64 + image_desc::DESCRIPTOR_LEN].copy_from_slice(&image_desc::descriptor(
            ImageArch::Aarch64,
            1,
            1,
            "9.9.9",
            "x",
        ));
        image_desc::seal(&mut img).unwrap();
        assert_eq!(check_request(&img, ImageArch::Aarch64, 1 << 20).unwrap().version_str(), "9.9.9");
        assert_eq!(check_request(&img, ImageArch::Aarch64, 0), Err(RequestError::NoScratch));
        assert_eq!(check_request(&img, ImageArch::X86_64, 1 << 20).unwrap_err().reason(), "wrong-arch");
        assert_eq!(check_request(&img[..4096], ImageArch::Aarch64, 1 << 20).unwrap_err().reason(), "size-mismatch");
        assert_eq!(check_request(&img, ImageArch::Aarch64, 4096).unwrap_err().reason(), "too-large");
    }
}
