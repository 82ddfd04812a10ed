//! A growing, file-backed byte buffer: one writer appends, any number of readers read and seek
//! while it grows.
//!
//! This is the stage between an upload and the decoder. The disk absorbs a fast uploader, so
//! memory stays bounded whatever the upload's size: readers see the file through a memory map of
//! a bounded window (mapped pages count in RSS) that slides with their position and is re-mapped
//! as the written length grows — never past the written length, which would risk `SIGBUS`.
//!
//! Semantics, kept from the Python seed's `StreamingBuffer`:
//! - a read blocks until bytes exist past the reader's position and returns 0 only after EOF;
//! - `SeekFrom::End` (and every question about the total length) blocks until EOF;
//! - after an abort (the writer dropped without [`BufferWriter::finish`], or [`Buffer::abort`]),
//!   every blocked or later read fails at once.
//!
//! Waiting uses one condition variable; the actors turn their messages into its wake-ups.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use memmap2::{Mmap, MmapOptions};

/// File-name prefix of every buffer's temp file, so a start-up sweep can find the ones a crash
/// left behind.
pub const TEMP_PREFIX: &str = "streamdet-upload-";

/// How far behind its position a reader's window starts.
const BACKWARD_SLACK: u64 = 64 << 10;

/// Where buffers live and how much of them a reader maps at once.
#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// Directory of the temp files (created mode 0600).
    pub dir: PathBuf,
    /// Bytes a reader maps at once; rounded up to whole pages.
    pub window_bytes: usize,
}

impl Default for BufferOptions {
    fn default() -> Self {
        BufferOptions { dir: std::env::temp_dir(), window_bytes: 32 << 20 }
    }
}

/// How the writer's side ended, if it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteState {
    /// Bytes may still arrive.
    Open,
    /// `finish` was called: the length is final.
    Finished,
    /// The upload was abandoned: reads fail.
    Aborted,
}

#[derive(Debug)]
struct State {
    written: u64,
    write_state: WriteState,
    path: PathBuf,
    persisted: bool,
    /// Bytes before this offset have been punched out of the file.
    discarded_before: u64,
}

#[derive(Debug)]
struct Shared {
    file: File,
    state: Mutex<State>,
    changed: Condvar,
    window_bytes: usize,
    /// The furthest offset any reader has read up to or waits at; lets an uploader measure the
    /// decoder's lag.
    furthest_read: AtomicU64,
    /// Live readers; with none, nobody can fall behind.
    readers: AtomicUsize,
    /// Signalled when a reader moves on or goes away, for a writer waiting in
    /// [`Buffer::wait_lag_at_most`].
    progress: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave `State` half-updated (every update is a
        // single assignment), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks until `pos` is readable, the writer finished, or it aborted. Returns the written
    /// length at that moment.
    fn wait_readable(&self, pos: u64) -> io::Result<u64> {
        let mut state = self.lock();
        loop {
            match state.write_state {
                WriteState::Aborted => return Err(aborted()),
                _ if pos < state.written => break,
                WriteState::Finished => break,
                WriteState::Open => state = self.wait(state),
            }
        }
        if pos < state.discarded_before {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("offset {pos} was discarded from the buffer (before {})", state.discarded_before)));
        }
        Ok(state.written)
    }

    fn wait_final_len(&self) -> io::Result<u64> {
        let mut state = self.lock();
        loop {
            match state.write_state {
                WriteState::Aborted => return Err(aborted()),
                WriteState::Finished => return Ok(state.written),
                WriteState::Open => state = self.wait(state),
            }
        }
    }

    fn set_write_state(&self, to: WriteState) {
        let mut state = self.lock();
        if state.write_state == WriteState::Open {
            state.write_state = to;
        }
        drop(state);
        self.changed.notify_all();
        self.progress.notify_waiters();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !state.persisted
            && let Err(err) = std::fs::remove_file(&state.path)
        {
            tracing::warn!(path = %state.path.display(), %err, "could not remove buffer temp file");
        }
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the upload was aborted")
}

/// Creates an empty buffer in `options.dir` and returns its only writer.
pub fn create(options: &BufferOptions) -> io::Result<BufferWriter> {
    let temp = tempfile::Builder::new().prefix(TEMP_PREFIX).tempfile_in(&options.dir)?;
    // We own deletion from here on (see `Shared::drop`): `persist` must be able to rename the
    // file while readers keep using it.
    let (file, path) = temp.keep().map_err(|err| err.error)?;
    // A shared lock for the file's lifetime tells `sweep_stale` (in any process) that it is in use.
    lock(&file, libc::LOCK_SH)?;
    let page = page_size();
    let window_bytes = options.window_bytes.max(page).div_ceil(page) * page;
    let shared = Arc::new(Shared {
        file,
        state: Mutex::new(State { written: 0, write_state: WriteState::Open, path, persisted: false, discarded_before: 0 }),
        changed: Condvar::new(),
        window_bytes,
        furthest_read: AtomicU64::new(0),
        readers: AtomicUsize::new(0),
        progress: tokio::sync::Notify::new(),
    });
    Ok(BufferWriter { buffer: Buffer { shared }, len: 0, done: false })
}

/// The only writer of a buffer. Dropping it without [`finish`](Self::finish) aborts the buffer.
#[derive(Debug)]
pub struct BufferWriter {
    buffer: Buffer,
    len: u64,
    done: bool,
}

impl BufferWriter {
    /// Appends `data` and wakes every reader waiting for it.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let shared = &self.buffer.shared;
        if shared.lock().write_state == WriteState::Aborted {
            return Err(aborted());
        }
        // One writer: nobody else writes at `len`, so the write needs no lock.
        shared.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        shared.lock().written = self.len;
        shared.changed.notify_all();
        Ok(())
    }

    /// Marks the end of the data: readers at the end now see EOF, and the length is final.
    pub fn finish(mut self) -> Buffer {
        self.done = true;
        self.buffer.shared.set_write_state(WriteState::Finished);
        self.buffer.clone()
    }

    /// Bytes appended so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// A handle to the buffer this writer fills.
    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }
}

impl Drop for BufferWriter {
    fn drop(&mut self) {
        if !self.done {
            self.buffer.shared.set_write_state(WriteState::Aborted);
        }
    }
}

/// A shared handle to a buffer: status, readers, persistence. Cheap to clone; the temp file is
/// deleted when the last handle (writer, buffer or reader) drops, unless it was persisted.
#[derive(Debug, Clone)]
pub struct Buffer {
    shared: Arc<Shared>,
}

impl Buffer {
    /// A new reader at offset 0.
    pub fn reader(&self) -> BufferReader {
        self.shared.readers.fetch_add(1, Ordering::AcqRel);
        BufferReader { shared: Arc::clone(&self.shared), pos: 0, window: None }
    }

    /// Bytes written so far (does not wait).
    pub fn written(&self) -> u64 {
        self.shared.lock().written
    }

    /// Whether the writer is still going, finished or aborted (does not wait).
    pub fn write_state(&self) -> WriteState {
        self.shared.lock().write_state
    }

    /// The final length: blocks until the writer finishes; fails if it aborts.
    pub fn wait_len(&self) -> io::Result<u64> {
        self.shared.wait_final_len()
    }

    /// The furthest offset any reader has read up to, or is waiting at.
    pub fn furthest_read(&self) -> u64 {
        self.shared.furthest_read.load(Ordering::Relaxed)
    }

    /// Bytes written beyond the furthest reader; 0 while a reader waits for bytes ahead of the
    /// writer (an MP4 whose index comes last), and `None` when no reader is left.
    pub fn lag(&self) -> Option<u64> {
        if self.shared.readers.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(self.written().saturating_sub(self.furthest_read()))
    }

    /// Waits until the readers are at most `max_lag` bytes behind the writer, no reader is left,
    /// or the buffer is aborted. A writer that awaits this before taking more input makes a slow
    /// reader push back on its source (for an HTTP body: TCP flow control on the client).
    pub async fn wait_lag_at_most(&self, max_lag: u64) {
        loop {
            // Registered before the check, so a reader moving on in between still wakes us.
            let notified = self.shared.progress.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.write_state() == WriteState::Aborted || self.lag().is_none_or(|lag| lag <= max_lag) {
                return;
            }
            notified.await;
        }
    }

    /// Where the file is now (changes after [`persist`](Self::persist)).
    pub fn path(&self) -> PathBuf {
        self.shared.lock().path.clone()
    }

    /// Abandons the buffer: the writer's next append fails and every blocked or later read
    /// returns an error at once.
    pub fn abort(&self) {
        self.shared.set_write_state(WriteState::Aborted);
    }

    /// Renames the file to `to` and keeps it after the last handle drops. Readers (and the
    /// writer) go on working: they hold the open file, not the name. Fails if `to` is on
    /// another filesystem while the upload is still open (nothing complete to copy yet).
    pub fn persist(&self, to: &Path) -> io::Result<()> {
        let mut state = self.shared.lock();
        match std::fs::rename(&state.path, to) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
                if state.write_state != WriteState::Finished {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, "cannot move an unfinished upload to another filesystem"));
                }
                copy_prefix(&self.shared.file, state.written, to)?;
                std::fs::remove_file(&state.path)?;
            }
            Err(err) => return Err(err),
        }
        state.path = to.to_path_buf();
        state.persisted = true;
        Ok(())
    }

    /// Frees the disk blocks before `offset` (rounded down to whole filesystem blocks) that no
    /// reader will need again, so that an unbounded live input keeps disk use bounded. Offsets
    /// stay valid; reading a discarded range is an error.
    pub fn discard_before(&self, offset: u64) -> io::Result<()> {
        let mut state = self.shared.lock();
        let offset = offset.min(state.written);
        let block = block_size(&self.shared.file)?;
        let end = offset / block * block;
        let start = state.discarded_before;
        if end <= start {
            return Ok(());
        }
        punch_hole(&self.shared.file, start, end - start)?;
        state.discarded_before = end;
        Ok(())
    }

    /// Bytes before this offset have been discarded.
    pub fn discarded_before(&self) -> u64 {
        self.shared.lock().discarded_before
    }
}

/// A temp file in `dir` that [`sweep_stale`] leaves alone while it is open (it holds the same
/// lock as a buffer's file), and removes once a crash has left it behind. Removed when dropped.
pub fn locked_temp_file(dir: &Path, suffix: &str) -> io::Result<tempfile::NamedTempFile> {
    let temp = tempfile::Builder::new().prefix(TEMP_PREFIX).suffix(suffix).tempfile_in(dir)?;
    lock(temp.as_file(), libc::LOCK_EX | libc::LOCK_NB)?;
    Ok(temp)
}

fn lock(file: &File, operation: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the lifetime of `file`; flock only reads its arguments.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Removes buffer files in `dir` that no live buffer holds — the ones a crashed process left
/// behind. Files of running buffers (in this or another process) are locked and stay. Returns
/// how many were removed.
pub fn sweep_stale(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(TEMP_PREFIX) || !entry.file_type()?.is_file() {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else { continue };
        if lock(&file, libc::LOCK_EX | libc::LOCK_NB).is_ok() && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn copy_prefix(file: &File, len: u64, to: &Path) -> io::Result<()> {
    let mut out = File::create(to)?;
    let mut source = file.try_clone()?;
    source.seek(SeekFrom::Start(0))?;
    io::copy(&mut source.take(len), &mut out)?;
    out.sync_all()
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it returns -1 only for an unknown name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

fn block_size(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blksize().max(512))
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "range too large"));
    };
    // SAFETY: the descriptor is open for the lifetime of `file`; fallocate only reads its
    // integer arguments. PUNCH_HOLE with KEEP_SIZE frees blocks without changing the length.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A mapped range of the file: `[start, start + map.len())`, all of it written.
#[derive(Debug)]
struct Window {
    start: u64,
    map: Mmap,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.map.len() as u64
    }
}

/// A reader with its own position. `Read` blocks until bytes exist; `Seek` to the end blocks
/// until EOF.
#[derive(Debug)]
pub struct BufferReader {
    shared: Arc<Shared>,
    pos: u64,
    window: Option<Window>,
}

impl BufferReader {
    /// A handle to the buffer this reader reads.
    pub fn buffer(&self) -> Buffer {
        Buffer { shared: Arc::clone(&self.shared) }
    }

    /// The reader's position.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The bytes mapped now, for tests and diagnostics.
    pub fn mapped_len(&self) -> usize {
        self.window.as_ref().map_or(0, |w| w.map.len())
    }

    /// Makes the window cover `pos`, given that `written > pos` bytes exist.
    fn map_around(&mut self, pos: u64, written: u64) -> io::Result<&Window> {
        let covers = |w: &Window| w.start <= pos && pos < w.end();
        if !self.window.as_ref().is_some_and(covers) {
            self.window = None; // unmap first: never hold two windows at once
            let window = self.shared.window_bytes as u64;
            // Start a little behind `pos` so that the small backward seeks demuxers make stay
            // inside the mapping, page-aligned as mmap requires.
            let start = pos.saturating_sub(BACKWARD_SLACK.min(window / 4)) / page_size() as u64 * page_size() as u64;
            let len = (written - start).min(window) as usize;
            // SAFETY: the mapping covers only bytes already written, and the file is never
            // truncated while a handle exists, so no access through it can fault. The bytes are
            // never changed after they are written (append-only; a punched hole is only made
            // below `discarded_before`, which reads refuse). `populate` pre-faults the pages in
            // one call instead of one fault per page.
            let map = unsafe { MmapOptions::new().offset(start).len(len).populate().map(&self.shared.file)? };
            self.window = Some(Window { start, map });
        }
        let window = self.window.as_ref().expect("window was just mapped");
        debug_assert!(covers(window), "the window must cover the position");
        Ok(window)
    }
}

impl Read for BufferReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pos = self.pos;
        if pos > self.shared.furthest_read.fetch_max(pos, Ordering::Relaxed) {
            // A reader asking beyond the others (waiting for the upload, perhaps) releases a
            // writer held back by the lag limit.
            self.shared.progress.notify_waiters();
        }
        let written = self.shared.wait_readable(pos)?;
        if pos >= written {
            return Ok(0); // finished, and we are at or past the end
        }
        let window = self.map_around(pos, written)?;
        let from = (pos - window.start) as usize;
        let n = buf.len().min(window.map.len() - from);
        buf[..n].copy_from_slice(&window.map[from..from + n]);
        self.pos += n as u64;
        self.shared.furthest_read.fetch_max(self.pos, Ordering::Relaxed);
        self.shared.progress.notify_waiters();
        Ok(n)
    }
}

impl Drop for BufferReader {
    fn drop(&mut self) {
        self.shared.readers.fetch_sub(1, Ordering::AcqRel);
        self.shared.progress.notify_waiters();
    }
}

impl Seek for BufferReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
            SeekFrom::End(delta) => self.shared.wait_final_len()?.checked_add_signed(delta),
        };
        let target = target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek to a negative or overflowing position"))?;
        self.pos = target;
        Ok(target)
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests;
