//! The teacher's response cache: an append-only store that survives SIGKILL and looks a reply
//! up in O(1), at the scale of millions of requests (no file per request).
//!
//! - **Layout:** `<cache_dir>/replies-<n>.log` segments of records. A record is the magic
//!   `MRC1`, the 32-byte key (sha256 of the request), the payload's length (u32 LE), the
//!   CRC-32 of key and payload (u32 LE), then the payload (the JSON cache entry).
//! - **Writers:** a process appends only to a segment it holds an exclusive lock on
//!   (`File::try_lock`), taking the first unlocked segment or a new one. Processes sharing the
//!   directory (Slurm array tasks) therefore never interleave their appends.
//! - **Kills:** a record cut off by a kill (short, or its CRC does not match) ends that
//!   segment's scan. The segment this process writes is truncated there first, so nothing is
//!   appended behind torn bytes. A segment another process holds is read up to its last whole
//!   record.
//! - **Lookups:** opening scans every segment once and keeps an index from the key's first 8
//!   bytes to the record's place; a lookup reads that one record and checks its full key and
//!   CRC. A later record for the same key wins.
//! - **Older caches:** the former layout (`<key[..2]>/<key>.json`, one file per request) is
//!   still read, so a run started by an older mira resumes without paying twice.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

const MAGIC: &[u8; 4] = b"MRC1";
const HEADER: usize = 4 + 32 + 4 + 4;
/// The largest payload a record may hold (a reply far beyond any model's output).
const MAX_PAYLOAD: usize = 64 << 20;

pub type Key = [u8; 32];

#[derive(Clone, Copy)]
struct Place {
    segment: usize,
    offset: u64,
    len: u32,
}

struct Writer {
    file: File,
    segment: usize,
    end: u64,
}

pub struct ReplyCache {
    dir: PathBuf,
    segments: Mutex<Vec<File>>,
    index: Mutex<HashMap<u64, Place>>,
    writer: Mutex<Option<Writer>>,
    /// Whether the directory holds entries in the one-file-per-request layout.
    legacy: bool,
}

fn segment_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("replies-{n}.log"))
}

fn short(key: &Key) -> u64 {
    u64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
}

fn crc(key: &Key, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(payload);
    h.finalize()
}

/// One whole record found by [`scan`]: its key, offset and payload length.
type Found = (Key, u64, u32);

/// The whole records at the start of a segment, and where the last whole record ends.
fn scan(file: &File) -> Result<(Vec<Found>, u64)> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut header = [0u8; HEADER];
    let mut payload = Vec::new();
    loop {
        if r.read_exact(&mut header).is_err() || &header[..4] != MAGIC {
            break;
        }
        let key: Key = header[4..36].try_into().expect("32 bytes");
        let len = u32::from_le_bytes(header[36..40].try_into().expect("4 bytes"));
        let sum = u32::from_le_bytes(header[40..44].try_into().expect("4 bytes"));
        if len as usize > MAX_PAYLOAD {
            break;
        }
        payload.resize(len as usize, 0);
        if r.read_exact(&mut payload).is_err() || crc(&key, &payload) != sum {
            break;
        }
        out.push((key, at, len));
        at += (HEADER + len as usize) as u64;
    }
    Ok((out, at))
}

impl ReplyCache {
    /// Open (or create) the cache in `dir`, indexing every segment.
    pub fn open(dir: &Path) -> Result<ReplyCache> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache dir {}", dir.display()))?;
        let mut segments = Vec::new();
        let mut index = HashMap::new();
        let mut writer = None;
        for n in 0.. {
            let path = segment_path(dir, n);
            if !path.exists() {
                break;
            }
            let file = crate::corpus::output::open_log(&path)?;
            let (records, end) =
                scan(&file).with_context(|| format!("reading {}", path.display()))?;
            for (key, offset, len) in records {
                index.insert(
                    short(&key),
                    Place {
                        segment: n,
                        offset,
                        len,
                    },
                );
            }
            if writer.is_none() && file.try_lock().is_ok() {
                // Ours alone now: drop a torn tail so appends follow the last whole record.
                file.set_len(end)
                    .with_context(|| format!("cannot truncate {}", path.display()))?;
                let mut w = file.try_clone()?;
                w.seek(SeekFrom::Start(end))?;
                writer = Some(Writer {
                    file: w,
                    segment: n,
                    end,
                });
            }
            segments.push(file);
        }
        let legacy = std::fs::read_dir(dir)?.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.len() == 2 && name.chars().all(|c| c.is_ascii_hexdigit()) && e.path().is_dir()
        });
        Ok(ReplyCache {
            dir: dir.to_path_buf(),
            segments: Mutex::new(segments),
            index: Mutex::new(index),
            writer: Mutex::new(writer),
            legacy,
        })
    }

    /// Entries in the index.
    pub fn len(&self) -> usize {
        self.index.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload stored for `key`, if any.
    pub fn get(&self, key: &Key) -> Option<Vec<u8>> {
        let place = self.index.lock().unwrap().get(&short(key)).copied();
        if let Some(p) = place {
            let mut buf = vec![0u8; HEADER + p.len as usize];
            let read = {
                let segments = self.segments.lock().unwrap();
                segments[p.segment].read_exact_at(&mut buf, p.offset)
            };
            if read.is_ok() && buf[4..36] == key[..] {
                let payload = buf.split_off(HEADER);
                let sum = u32::from_le_bytes(buf[40..44].try_into().expect("4 bytes"));
                if crc(key, &payload) == sum {
                    return Some(payload);
                }
            }
        }
        if self.legacy {
            return std::fs::read(self.legacy_path(key)).ok();
        }
        None
    }

    fn legacy_path(&self, key: &Key) -> PathBuf {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// Append `payload` for `key` (one write per record) and index it.
    pub fn put(&self, key: &Key, payload: &[u8]) -> Result<()> {
        anyhow::ensure!(
            payload.len() <= MAX_PAYLOAD,
            "cache entry of {} bytes is over the {} byte limit",
            payload.len(),
            MAX_PAYLOAD
        );
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(key);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc(key, payload).to_le_bytes());
        record.extend_from_slice(payload);
        let mut guard = self.writer.lock().unwrap();
        if guard.is_none() {
            *guard = Some(self.new_segment()?);
        }
        let w = guard.as_mut().expect("a writer");
        w.file
            .write_all(&record)
            .with_context(|| format!("cannot append to the cache in {}", self.dir.display()))?;
        let place = Place {
            segment: w.segment,
            offset: w.end,
            len: payload.len() as u32,
        };
        w.end += record.len() as u64;
        self.index.lock().unwrap().insert(short(key), place);
        Ok(())
    }

    /// A fresh segment, locked for this process.
    fn new_segment(&self) -> Result<Writer> {
        let mut segments = self.segments.lock().unwrap();
        let mut n = segments.len();
        loop {
            let path = segment_path(&self.dir, n);
            match crate::corpus::output::create_log(&path)? {
                Some(file) => {
                    file.try_lock()
                        .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?;
                    // Earlier numbers another process created since we opened are not ours to
                    // read; keep the positions in `segments` aligned with the numbers.
                    while segments.len() < n {
                        let p = segment_path(&self.dir, segments.len());
                        segments.push(File::open(&p)?);
                    }
                    segments.push(file.try_clone()?);
                    return Ok(Writer {
                        file,
                        segment: n,
                        end: 0,
                    });
                }
                None => n += 1,
            }
        }
    }
}
