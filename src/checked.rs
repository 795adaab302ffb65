//! The one place where numbers and files from outside (config files, the command line, a
//! teacher's HTTP headers, a checkpoint's metadata) become values mira uses. Every check names
//! what it checked, so a bad number is a clear error, never a panic, an abort or a silent
//! misbehaviour (`Duration::from_secs_f64(-1.0)` panics; `vec![0; 2^62]` aborts).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The longest wait mira accepts for anything (a request time-out, a server's `Retry-After`):
/// a week. Longer is a mistake, and large enough values overflow `Duration`.
pub const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// A count or size read from outside: at least `min`, at most `max`.
pub fn count(what: &str, value: usize, min: usize, max: usize) -> Result<usize> {
    if value < min || value > max {
        bail!("{what} is {value}; it must be between {min} and {max}");
    }
    Ok(value)
}

/// A finite number in `[lo, hi]` (`lo_open`/`hi_open` exclude the end).
pub fn in_range(
    what: &str,
    value: f64,
    lo: f64,
    hi: f64,
    lo_open: bool,
    hi_open: bool,
) -> Result<f64> {
    let above = if lo_open { value > lo } else { value >= lo };
    let below = if hi_open { value < hi } else { value <= hi };
    if !(value.is_finite() && above && below) {
        bail!(
            "{what} is {value}; it must be in {}{lo}, {hi}{}",
            if lo_open { "(" } else { "[" },
            if hi_open { ")" } else { "]" }
        );
    }
    Ok(value)
}

/// A finite number, zero or more (a price, a tolerance).
pub fn non_negative(what: &str, value: f64) -> Result<f64> {
    in_range(what, value, 0.0, f64::MAX, false, false)
}

/// Any finite number.
pub fn finite(what: &str, value: f64) -> Result<f64> {
    if !value.is_finite() {
        bail!("{what} is {value}; it must be a finite number");
    }
    Ok(value)
}

/// A positive duration in seconds (a time-out), at most [`MAX_SECONDS`].
pub fn seconds(what: &str, value: f64) -> Result<Duration> {
    in_range(what, value, 0.0, MAX_SECONDS, true, false)?;
    Ok(Duration::from_secs_f64(value))
}

/// A computed wait in seconds as a `Duration`, in `[0, max]` (NaN and negatives are 0).
pub fn clamped_seconds(value: f64, max: Duration) -> Duration {
    if value.is_nan() || value <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(value.min(max.as_secs_f64()))
}

/// A server's `Retry-After` header in seconds (RFC 9110 allows a non-negative integer; we take
/// decimals too). Anything else (negative, `inf`, `nan`, an HTTP date) is ignored, so the
/// client falls back to its own backoff; a huge value is capped at `cap`.
pub fn retry_after(header: &str, cap: Duration) -> Option<Duration> {
    let v: f64 = header.trim().parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(v.min(cap.as_secs_f64())))
}

/// Largest metadata file mira reads (`config.json`, `tokenizer.json`, an index, a
/// sentence-transformers file): 256 MiB, ten times the largest real tokenizer we know of.
pub const MAX_METADATA_BYTES: u64 = 256 << 20;

/// Read a metadata file of at most `max` bytes. Refuses what is not a regular file (a
/// `config.json` pointing at `/dev/zero` would otherwise be read until memory runs out) and
/// anything larger than `max`, naming the file.
pub fn read_small_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > max {
        bail!(
            "{} is {} bytes; metadata files may have at most {max}",
            path.display(),
            meta.len()
        );
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while we read it.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} grew past {max} bytes while being read", path.display());
    }
    Ok(bytes)
}

/// [`read_small_file`] as UTF-8 text, with the default cap.
pub fn read_metadata(path: &Path) -> Result<String> {
    let bytes = read_small_file(path, MAX_METADATA_BYTES)?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_are_errors_that_name_the_setting() {
        assert!(count("num_hidden_layers", 0, 1, 1024)
            .unwrap_err()
            .to_string()
            .contains("num_hidden_layers is 0"));
        assert!(count("num_hidden_layers", 1 << 62, 1, 1024).is_err());
        assert_eq!(count("k", 3, 1, 8).unwrap(), 3);
        for bad in [f64::NAN, f64::INFINITY, -0.5, 0.0, 1.5] {
            let e = in_range("budget", bad, 0.0, 1.0, true, false)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("budget is"), "{e}");
        }
        assert_eq!(in_range("budget", 1.0, 0.0, 1.0, true, false).unwrap(), 1.0);
        for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY, 1e30] {
            assert!(seconds("timeout_s", bad).is_err(), "{bad}");
        }
        assert_eq!(seconds("t", 2.5).unwrap(), Duration::from_millis(2500));
    }

    #[test]
    fn retry_after_ignores_what_is_not_a_wait() {
        let cap = Duration::from_secs(60);
        for bad in [
            "-1",
            "inf",
            "nan",
            "-inf",
            "",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "1e999",
        ] {
            assert_eq!(retry_after(bad, cap), None, "{bad}");
        }
        assert_eq!(retry_after(" 2 ", cap), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("1e12", cap), Some(cap));
    }

    #[test]
    fn metadata_reads_are_capped_and_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_small_file(&p, 10).unwrap().len(), 10);
        assert!(read_small_file(&p, 9)
            .unwrap_err()
            .to_string()
            .contains("config.json is 10 bytes"));
        let e = read_small_file(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero is not a regular file"), "{e}");
        assert!(read_small_file(dir.path(), 10).is_err());
    }
}
