//! Deleting large files slowly.
//!
//! On a filesystem mounted with `discard` (ext4 as Debian's cloud images mount it), the blocks a
//! deletion frees are trimmed in the next journal commit, and syncs on the disk wait behind
//! it: deleting a 512 MB directory here held a 512-byte `fdatasync` up to 789 ms. Replaced
//! snapshots (about 100 MB at 100k keys) and purged log segments (25 MiB) are therefore moved
//! into the data dir's `trash/` and shrunk a few MiB at a time, each step synced so that each
//! commit frees little, then unlinked; RocksDB's `DeleteScheduler` does the same for SSTs.
//! Trash left by a crash or a stop is cleared the same way when the member opens again.
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Name of the trash directory inside a data dir.
pub(crate) const DIR: &str = "trash";
/// Bytes freed per step.
const STEP_BYTES: u64 = 4 * 1024 * 1024;
/// Pause between steps: at most 100 MiB/s of trims.
const STEP_PAUSE: Duration = Duration::from_millis(40);

/// A data dir's trash: files handed to it disappear gradually, on a thread of their own.
#[derive(Debug, Clone)]
pub(crate) struct Trash {
    dir: PathBuf,
    queue: mpsc::Sender<PathBuf>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Trash {
    /// Opens `data_dir/trash`, creating it, and starts clearing what a previous run left.
    pub(crate) fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let (tx, rx) = mpsc::channel::<PathBuf>();
        for entry in std::fs::read_dir(&dir)? {
            // Nothing is received before the thread starts; the send cannot fail.
            let _ = tx.send(entry?.path());
        }
        std::thread::Builder::new()
            .name("flotilla-trash".into())
            .spawn(move || {
                // Ends when every handle is gone and the queue is drained; what is left
                // unfinished (a stop) is cleared at the next open.
                while let Ok(path) = rx.recv() {
                    if let Err(e) = shrink_and_unlink(&path)
                        && e.kind() != io::ErrorKind::NotFound
                    {
                        tracing::warn!(path = %path.display(), error = %e,
                            "could not delete a file from the trash; it is retried at the next start");
                    }
                }
            })?;
        Ok(Self { dir, queue: tx })
    }

    /// Moves `path` into the trash (durably, with its directory synced by the caller when
    /// that matters) and queues it for deletion.
    pub(crate) fn remove(&self, path: &Path) -> io::Result<()> {
        let to = self.slot(path);
        std::fs::rename(path, &to)?;
        self.queue(to);
        Ok(())
    }

    /// Gives the trash a second name for `path`, so that the file's blocks are not freed when
    /// `path` is replaced or unlinked next; call [`Trash::release`] with the result then.
    pub(crate) fn keep(&self, path: &Path) -> io::Result<Option<PathBuf>> {
        let to = self.slot(path);
        match std::fs::hard_link(path, &to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Queues a name returned by [`Trash::keep`] for deletion.
    pub(crate) fn release(&self, kept: Option<PathBuf>) {
        if let Some(path) = kept {
            self.queue(path);
        }
    }

    fn slot(&self, path: &Path) -> PathBuf {
        let name = path
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{}-{n}-{name}", std::process::id()))
    }

    fn queue(&self, path: PathBuf) {
        if let Err(mpsc::SendError(path)) = self.queue.send(path) {
            // The thread died (it never panics on IO errors; this is defensive): delete at once.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Frees `path`'s blocks [`STEP_BYTES`] at a time from the end, then unlinks it.
fn shrink_and_unlink(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return std::fs::remove_dir_all(path);
    }
    let file: File = OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > STEP_BYTES {
        len -= STEP_BYTES;
        file.set_len(len)?;
        file.sync_all()?;
        std::thread::sleep(STEP_PAUSE);
    }
    drop(file);
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_gone(path: &Path) {
        for _ in 0..500 {
            if !path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} was not deleted", path.display());
    }

    #[test]
    fn removes_files_and_clears_leftovers_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leftover = dir.path().join(DIR).join("old-1-x");
        std::fs::create_dir_all(leftover.parent().expect("parent")).expect("mkdir");
        std::fs::write(&leftover, vec![7u8; 9 * 1024 * 1024]).expect("write");
        let trash = Trash::open(dir.path()).expect("open");
        wait_gone(&leftover);

        let f = dir.path().join("segment.log");
        std::fs::write(&f, vec![1u8; 5 * 1024 * 1024]).expect("write");
        trash.remove(&f).expect("remove");
        assert!(!f.exists(), "moved out of the way at once");
        for _ in 0..500 {
            if std::fs::read_dir(dir.path().join(DIR))
                .expect("read")
                .next()
                .is_none()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("trash not emptied");
    }

    #[test]
    fn a_kept_file_survives_its_replacement_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trash = Trash::open(dir.path()).expect("open");
        let current = dir.path().join("snapshot");
        std::fs::write(&current, b"old").expect("write");
        let kept = trash.keep(&current).expect("keep");
        let kept_path = kept.clone().expect("linked");
        std::fs::write(dir.path().join("new"), b"new").expect("write");
        std::fs::rename(dir.path().join("new"), &current).expect("rename");
        assert_eq!(std::fs::read(&kept_path).expect("read"), b"old");
        assert_eq!(std::fs::read(&current).expect("read"), b"new");
        trash.release(kept);
        wait_gone(&kept_path);
        assert!(
            trash
                .keep(&dir.path().join("missing"))
                .expect("keep")
                .is_none()
        );
    }
}
