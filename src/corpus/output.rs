//! Where output may go, and how it gets there. Every file mira writes is opened here, so these
//! rules hold everywhere:
//!
//! - [`Destination::of`]: `-` is standard output; an existing character device, FIFO or socket
//!   (`/dev/null`, a named pipe, `/dev/stdout`) is written in place as a stream; anything else is
//!   a regular file, written under a hidden temporary name beside it (`.NAME.<pid>.tmp`), synced
//!   and renamed into place when complete. Atomic replacement is for regular files only: renaming
//!   a temporary file over `/dev/null` would turn the device into a regular file.
//! - [`OutputFile`]: a `Write` to any destination; [`OutputFile::commit`] makes it visible; one
//!   dropped without a commit (an error, `--strict`) removes its temporary file and leaves any
//!   previous output untouched.
//! - [`refuse_input`]: an output that is one of the job's inputs is refused before anything is
//!   read, naming both paths (writing it would destroy the input).
//! - [`open_log`], [`create_log`]: append-only logs (the teacher's response cache), which grow
//!   in place by whole records and are never replaced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::InputFile;

/// How an output path is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `-`.
    Stdout,
    /// An existing special file (character device, FIFO, socket): written in place, in order.
    Stream(PathBuf),
    /// A regular file (existing or not): temporary file, then rename.
    File(PathBuf),
}

impl Destination {
    pub fn of(path: &Path) -> Result<Destination> {
        if path.as_os_str() == "-" {
            return Ok(Destination::Stdout);
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => bail!("output {} is a directory", path.display()),
            Ok(m) if !m.is_file() => Ok(Destination::Stream(path.to_path_buf())),
            _ => Ok(Destination::File(path.to_path_buf())),
        }
    }

    /// Whether the output is a regular file (which can be resumed, marked done, renamed).
    pub fn is_file(&self) -> bool {
        matches!(self, Destination::File(_))
    }
}

/// An output being written; see the module docs.
pub struct OutputFile {
    state: State,
}

enum State {
    Stdout(std::io::Stdout),
    Stream {
        file: File,
        path: PathBuf,
    },
    Atomic {
        file: File,
        tmp: PathBuf,
        dest: PathBuf,
    },
    Committed,
}

impl OutputFile {
    pub fn create(path: &Path) -> Result<OutputFile> {
        let state = match Destination::of(path)? {
            Destination::Stdout => State::Stdout(std::io::stdout()),
            Destination::Stream(path) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {} for writing", path.display()))?;
                State::Stream { file, path }
            }
            Destination::File(dest) => {
                // Hidden, and unique per process so concurrent jobs never share a temporary file.
                let tmp = temp_name(&dest, std::process::id())?;
                let file = File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                // Held until the file is renamed or the process dies (even by SIGKILL): another
                // job sees that this output is being written ([`live_writer`]) and leaves it
                // alone. A file system without locks just cannot tell.
                let _ = file.try_lock();
                State::Atomic { file, tmp, dest }
            }
        };
        Ok(OutputFile { state })
    }

    /// What is being written, for messages.
    pub fn name(&self) -> String {
        match &self.state {
            State::Stdout(_) => "standard output".into(),
            State::Stream { path, .. } => path.display().to_string(),
            State::Atomic { tmp, .. } => tmp.display().to_string(),
            State::Committed => "a finished output".into(),
        }
    }

    /// Make the output visible: sync and rename a regular file; flush a stream.
    pub fn commit(mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Committed) {
            State::Stdout(mut out) => out.flush()?,
            State::Stream { mut file, path } => file
                .flush()
                .with_context(|| format!("cannot write {}", path.display()))?,
            State::Atomic { file, tmp, dest } => {
                file.sync_all()
                    .with_context(|| format!("cannot sync {}", tmp.display()))?;
                std::fs::rename(&tmp, &dest).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), dest.display())
                })?;
            }
            State::Committed => {}
        }
        Ok(())
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.state {
            State::Stdout(out) => out.write(buf),
            State::Stream { file, .. } | State::Atomic { file, .. } => file.write(buf),
            State::Committed => Err(std::io::Error::other("write after commit")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.state {
            State::Stdout(out) => out.flush(),
            State::Stream { file, .. } | State::Atomic { file, .. } => file.flush(),
            State::Committed => Ok(()),
        }
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let State::Atomic { tmp, .. } = &self.state {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// The hidden temporary name a regular-file output `path` is written under, for this process.
pub(crate) fn temp_name(path: &Path, pid: u32) -> Result<PathBuf> {
    let file_name = path
        .file_name()
        .with_context(|| format!("invalid output path {}", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(file_name);
    tmp.push(format!(".{pid}.tmp"));
    Ok(path.with_file_name(tmp))
}

/// The temporary files of `path` (`.NAME.<pid>.tmp`) in its folder.
fn temps_of(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n.ends_with(".tmp")
        })
        .map(|e| e.path())
        .collect()
}

/// Whether a live writer (another job, or another output of this one) holds a temporary file
/// of `path`: its lock is taken.
fn is_held(tmp: &Path) -> bool {
    match File::open(tmp) {
        Ok(f) => match f.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => false,
        },
        Err(_) => false,
    }
}

/// Whether another live writer is writing `path` right now (a second job on the same output
/// folder): such an output is left to it.
pub fn live_writer(path: &Path) -> bool {
    temps_of(path).iter().any(|t| is_held(t))
}

/// [`live_writer`] for many outputs: each folder is listed once (a job over 50,000 files in one
/// folder would otherwise list it 50,000 times), for its temporary files only.
#[derive(Default)]
pub struct LiveWriters {
    temps_by_dir: std::collections::HashMap<PathBuf, Vec<std::ffi::OsString>>,
}

impl LiveWriters {
    pub fn holds(&mut self, path: &Path) -> bool {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let temps = self
            .temps_by_dir
            .entry(dir.to_path_buf())
            .or_insert_with(|| {
                std::fs::read_dir(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                })
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name())
                        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
                        .collect()
                })
                .unwrap_or_default()
            });
        let prefix = format!(".{}.", name.to_string_lossy());
        temps
            .iter()
            .filter(|n| n.to_string_lossy().starts_with(&prefix))
            .any(|n| is_held(&dir.join(n)))
    }
}

/// Remove temporary files that killed writers of `path` left behind (`.NAME.<pid>.tmp` whose
/// lock nobody holds); a live writer's file is left alone.
pub fn remove_stale_temps(path: &Path) -> Result<()> {
    for tmp in temps_of(path) {
        if !is_held(&tmp) {
            std::fs::remove_file(&tmp)
                .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
        }
    }
    Ok(())
}

/// An existing append-only log, for reading and writing in place (its owner truncates a torn
/// tail, then appends).
pub fn open_log(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// A new append-only log; `Ok(None)` when `path` exists already (another process made it).
pub fn create_log(path: &Path) -> Result<Option<File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Write `bytes` to `path` (atomically, when it is a regular file).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = OutputFile::create(path)?;
    out.write_all(bytes)
        .with_context(|| format!("cannot write {}", out.name()))?;
    out.commit()
}

/// [`write_atomic`], then remove the temporaries that killed earlier writers of `path` left
/// beside it (one listing of its folder): for cutoffs, reports and done markers, which a rerun
/// writes again whole.
pub fn write_once(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes)?;
    remove_stale_temps(path)
}

/// Where the done marker of `out` (an output below the job's output folder `root`) lives:
/// `<root>/.mira/done/<out's path below root>.done`. Markers stay out of the data folders, so
/// readers that glob them (`dolma --attributes .../*`, Hugging Face `load_dataset(data_dir=...)`)
/// see only data; datatrove keeps its completions apart the same way.
pub fn done_marker(root: &Path, out: &Path) -> PathBuf {
    let rel = out.strip_prefix(root).unwrap_or(out);
    let rel = rel
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect::<PathBuf>();
    let mut name = root.join(".mira").join("done").join(rel).into_os_string();
    name.push(".done");
    PathBuf::from(name)
}

/// `<out>.done` beside the output, where mira 0.1 kept markers.
fn legacy_marker(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_os_string();
    name.push(".done");
    PathBuf::from(name)
}

/// Whether `out` is complete: it exists and has a done marker. A marker beside the output (the
/// old layout) still counts, and is moved to [`done_marker`]'s place.
pub fn is_done(root: &Path, out: &Path) -> bool {
    if !out.exists() {
        return false;
    }
    let marker = done_marker(root, out);
    if marker.exists() {
        return true;
    }
    let legacy = legacy_marker(out);
    if legacy.is_file() {
        let moved = marker
            .parent()
            .is_some_and(|p| std::fs::create_dir_all(p).is_ok())
            && std::fs::rename(&legacy, &marker).is_ok();
        return moved || legacy.exists();
    }
    false
}

/// The contents of `out`'s done marker, when `out` is complete.
pub fn done_summary(root: &Path, out: &Path) -> Option<Vec<u8>> {
    if !is_done(root, out) {
        return None;
    }
    std::fs::read(done_marker(root, out)).ok()
}

/// Mark `out` complete, with `summary` as the marker's contents.
pub fn mark_done(root: &Path, out: &Path, summary: &[u8]) -> Result<()> {
    let marker = done_marker(root, out);
    if let Some(parent) = marker.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    write_once(&marker, summary)
}

/// Forget that `out` was complete (it is about to be rewritten).
pub fn clear_done(root: &Path, out: &Path) {
    let _ = std::fs::remove_file(done_marker(root, out));
    let _ = std::fs::remove_file(legacy_marker(out));
}

/// Refuse `output` when it is one of `inputs` (the same file, however it is named: through a
/// symlink, a hard link or `..`), naming both. Writing it would replace the input before (or
/// while) it is read.
pub fn refuse_input(output: &Path, inputs: &[InputFile]) -> Result<()> {
    InputIds::of(inputs).refuse(output)
}

/// The identities of a job's inputs, taken once, for checking many outputs against them (one
/// lookup per output instead of a pass over every input).
pub struct InputIds<'a> {
    by_id: std::collections::HashMap<FileId, &'a Path>,
}

impl<'a> InputIds<'a> {
    pub fn of(inputs: &'a [InputFile]) -> InputIds<'a> {
        let by_id = inputs
            .iter()
            .filter_map(|f| file_id(&f.path).map(|id| (id, f.path.as_path())))
            .collect();
        InputIds { by_id }
    }

    /// Refuse `output` when it is one of the inputs; see [`refuse_input`].
    pub fn refuse(&self, output: &Path) -> Result<()> {
        // An output that does not exist yet is no input.
        if let Some(input) = file_id(output).and_then(|id| self.by_id.get(&id)) {
            bail!(
                "output {} is the input {}: writing it would destroy the input; choose another output",
                output.display(),
                input.display()
            );
        }
        Ok(())
    }
}

#[cfg(unix)]
type FileId = (u64, u64);
#[cfg(not(unix))]
type FileId = PathBuf;

/// The identity of an existing file (device and inode on Unix, the canonical path elsewhere).
#[cfg(unix)]
fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(path: &Path) -> Option<FileId> {
    std::fs::canonicalize(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Destination::of(Path::new("-")).unwrap(),
            Destination::Stdout
        );
        let f = dir.path().join("x.jsonl");
        assert!(Destination::of(&f).unwrap().is_file());
        std::fs::write(&f, b"").unwrap();
        assert!(Destination::of(&f).unwrap().is_file());
        assert_eq!(
            Destination::of(Path::new("/dev/null")).unwrap(),
            Destination::Stream("/dev/null".into())
        );
        assert!(Destination::of(dir.path()).is_err());
    }

    #[test]
    fn an_uncommitted_output_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.txt");
        std::fs::write(&f, b"old").unwrap();
        let mut out = OutputFile::create(&f).unwrap();
        out.write_all(b"new").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
    }

    #[test]
    fn a_live_writers_temporary_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.jsonl");
        let live = OutputFile::create(&f).unwrap();
        assert!(live_writer(&f));
        remove_stale_temps(&f).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "kept");
        // A killed writer's file: nobody holds it.
        let stale = temp_name(&f, 999_999_999).unwrap();
        std::fs::write(&stale, b"partial").unwrap();
        remove_stale_temps(&f).unwrap();
        assert!(!stale.exists());
        assert!(live_writer(&f));
        live.commit().unwrap();
        assert!(!live_writer(&f));
        assert!(f.exists());
    }

    #[test]
    fn markers_live_outside_the_data_and_old_ones_move_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let out = root.join("a/x.jsonl");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        assert_eq!(
            done_marker(root, &out),
            root.join(".mira/done/a/x.jsonl.done")
        );
        std::fs::write(&out, b"{}\n").unwrap();
        assert!(!is_done(root, &out));
        mark_done(root, &out, b"").unwrap();
        assert!(is_done(root, &out));
        assert_eq!(
            std::fs::read_dir(root.join("a")).unwrap().count(),
            1,
            "data only"
        );
        clear_done(root, &out);
        assert!(!is_done(root, &out));
        std::fs::write(root.join("a/x.jsonl.done"), b"").unwrap();
        assert!(is_done(root, &out), "an old marker counts");
        assert!(!root.join("a/x.jsonl.done").exists(), "and moves");
        assert!(done_marker(root, &out).exists());
    }

    #[test]
    fn an_input_is_refused_as_output_by_any_name() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("a.jsonl");
        std::fs::write(&input, b"{}\n").unwrap();
        let inputs = [InputFile {
            path: input.clone(),
            rel: "a.jsonl".into(),
        }];
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let e = refuse_input(&sub.join("../a.jsonl"), &inputs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the input") && e.contains("a.jsonl"), "{e}");
        #[cfg(unix)]
        {
            let link = dir.path().join("link.jsonl");
            std::os::unix::fs::symlink(&input, &link).unwrap();
            assert!(refuse_input(&link, &inputs).is_err());
        }
        assert!(refuse_input(&dir.path().join("b.jsonl"), &inputs).is_ok());
    }
}
