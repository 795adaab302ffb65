//! f32 values in host memory on their way into a backend: owned, or read in place from a
//! memory-mapped checkpoint. A checkpoint stored in f32 (little-endian, 4-byte aligned, which
//! safetensors' 8-byte-aligned header gives) is not copied at load: the CPU backend computes from
//! the file's pages, which the page cache shares between every process that maps the same file
//! (several workers of a Ray or Slurm job on one node hold one copy of the weights), and an
//! embedding table is read only where its rows are looked up. Other dtypes, and tensors a backend
//! transforms (bf16 rounding, int8 quantization, the device copy of a GPU), are converted.
//!
//! Like every loader that maps its weights (llama.cpp, safetensors' own `safe_open`), this assumes
//! the checkpoint file is not truncated or rewritten in place while a model that maps it is alive:
//! replace a checkpoint by writing a new file and renaming it over the old one, as mira does.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use memmap2::Mmap;

/// f32 values, owned or borrowed from a mapped file; derefs to `[f32]` either way.
#[derive(Clone)]
pub struct HostF32(Repr);

#[derive(Clone)]
enum Repr {
    Owned(Vec<f32>),
    /// `len` f32 values at byte `start` of `map`; `start` is 4-byte aligned in memory.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
}

impl HostF32 {
    /// The f32 values stored at `bytes` (`map[start..end]`, little-endian) read in place, or
    /// `None` where they cannot be: a length not a multiple of 4, an address not 4-byte aligned,
    /// or a big-endian machine.
    pub fn mapped(map: &Arc<Mmap>, start: usize, end: usize) -> Option<HostF32> {
        let bytes = map.get(start..end)?;
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
        (cfg!(target_endian = "little") && aligned && bytes.len().is_multiple_of(4)).then(|| {
            HostF32(Repr::Mapped {
                map: Arc::clone(map),
                start,
                len: bytes.len() / 4,
            })
        })
    }

    /// Whether the values are read in place from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }
}

impl From<Vec<f32>> for HostF32 {
    fn from(v: Vec<f32>) -> HostF32 {
        HostF32(Repr::Owned(v))
    }
}

impl Deref for HostF32 {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { map, start, len } => {
                let bytes = &map[*start..*start + *len * 4];
                // SAFETY: `mapped` checked that these bytes lie inside the map, are 4-byte aligned
                // and hold `len` f32 values (any bit pattern is a valid f32); the map is read-only
                // and lives as long as this `Arc`.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), *len) }
            }
        }
    }
}

/// Writing to mapped values copies them first (copy on write): the file is never written.
impl DerefMut for HostF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        if let Repr::Mapped { .. } = self.0 {
            self.0 = Repr::Owned(self.to_vec());
        }
        match &mut self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } => unreachable!("mapped values were copied above"),
        }
    }
}

/// The kind and length, not the values (a weight has millions).
impl fmt::Debug for HostF32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "HostF32({kind}, {} values)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn map_of(bytes: &[u8]) -> Arc<Mmap> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        // SAFETY: a private temporary file nobody else can truncate.
        Arc::new(unsafe { Mmap::map(&f) }.unwrap())
    }

    #[test]
    fn mapped_values_read_in_place_and_copy_on_write() {
        let values = [1.5f32, -2.25, 3.0e-8, f32::MAX];
        let bytes: Vec<u8> = [0u8; 4]
            .into_iter()
            .chain(values.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        let map = map_of(&bytes);
        let mut v = HostF32::mapped(&map, 4, bytes.len()).expect("aligned f32 values");
        assert!(v.is_mapped());
        assert_eq!(&v[..], &values);
        assert!(HostF32::mapped(&map, 2, 18).is_none(), "misaligned start");
        assert!(HostF32::mapped(&map, 4, 7).is_none(), "not a whole f32");
        assert!(HostF32::mapped(&map, 4, 40).is_none(), "past the end");
        v[0] = 7.0;
        assert!(!v.is_mapped());
        assert_eq!(&v[..], &[7.0, -2.25, 3.0e-8, f32::MAX]);
        let again = HostF32::mapped(&map, 4, bytes.len()).unwrap();
        assert_eq!(again[0], 1.5, "the file is never written");
        assert_eq!(&again[..], &values);
    }
}
