//! Human sizes: parsing `1G`, `512M`, `4096` and printing bytes as KiB/MiB/GiB.

/// Why a size given on the command line is unusable (clap prints it under the flag).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size (examples: 1G, 512M, 1048576)")]
    NotASize(String),
    #[error("{0:?} is zero or too large")]
    OutOfRange(String),
    #[error(
        "{text:?} ({size} bytes) is not a multiple of {VOLUME_SIZE_ALIGN} bytes; \
         use {up} or a size such as 1G or 512M"
    )]
    Unaligned { text: String, size: u64, up: u64 },
}

/// Parses a size with an optional binary suffix (K, M, G, T; `iB`/`B` accepted).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let stripped = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match stripped.chars().last() {
        Some('K') => (&stripped[..stripped.len() - 1], 10),
        Some('M') => (&stripped[..stripped.len() - 1], 20),
        Some('G') => (&stripped[..stripped.len() - 1], 30),
        Some('T') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    n.checked_mul(1u64 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| SizeError::OutOfRange(text.to_string()))
}

/// Volumes are sized in whole 4 KiB blocks: every NBD client, the kernel's page cache and the
/// journal's block index work in those, and a ragged tail would be unreachable for most.
pub const VOLUME_SIZE_ALIGN: u64 = 4096;

/// A volume size: `parse_size`, and a multiple of `VOLUME_SIZE_ALIGN`.
pub fn parse_volume_size(text: &str) -> Result<u64, SizeError> {
    let size = parse_size(text)?;
    if size % VOLUME_SIZE_ALIGN != 0 {
        let up = size.div_ceil(VOLUME_SIZE_ALIGN) * VOLUME_SIZE_ALIGN;
        return Err(SizeError::Unaligned {
            text: text.to_string(),
            size,
            up,
        });
    }
    Ok(size)
}

pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_bytes(1 << 30), "1.0 GiB");
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(parse_volume_size("1M"), Ok(1 << 20));
        assert!(parse_volume_size("1000").is_err());
        assert!(parse_volume_size("4097").is_err());
    }
}
