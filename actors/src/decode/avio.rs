//! FFmpeg custom I/O over a [`BufferReader`]: the only way the demuxer reads bytes.
//!
//! - A read blocks until its bytes exist; EOF comes only after the writer finished; after an
//!   abort the callback returns `AVERROR_EXIT` (FFmpeg does not poll its interrupt callback
//!   around custom I/O, so cancelling means waking the blocked read — the buffer does that).
//! - Size questions (`AVSEEK_SIZE`, `SEEK_END`) are answered "unknown" until EOF: libavformat
//!   asks them while opening every container, and a blocking answer would stall every format
//!   until the upload ends.
//! - The context is marked not seekable, which keeps the mov demuxer from skipping to the end of
//!   `mdat` on faststart files, but the seek callback stays, so a demuxer that must go back (moov
//!   at the end) still can; a read past the written length then waits.
//! - No panic crosses the `extern "C"` boundary.

use std::ffi::{c_int, c_void};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::panic::{AssertUnwindSafe, catch_unwind};

use ffmpeg_next::ffi;

use crate::buffer::{BufferReader, WriteState};

const IO_BUFFER_BYTES: usize = 64 * 1024;

/// `AVERROR(e)` for a POSIX error number.
const fn averror(errno: c_int) -> c_int {
    -errno
}

struct IoState {
    reader: BufferReader,
}

/// An `AVIOContext` that reads a buffer. Owns the context, its I/O buffer and the reader; must
/// outlive the format context that uses it.
pub struct BufferIo {
    ctx: *mut ffi::AVIOContext,
    state: *mut IoState,
}

// SAFETY: the context and state are heap allocations used by one thread at a time (the decoder
// thread that owns this value); `BufferReader` is `Send`.
unsafe impl Send for BufferIo {}

impl BufferIo {
    pub fn new(reader: BufferReader) -> Option<Self> {
        let state = Box::into_raw(Box::new(IoState { reader }));
        // SAFETY: av_malloc returns a buffer of the requested size or null.
        let buffer = unsafe { ffi::av_malloc(IO_BUFFER_BYTES) } as *mut u8;
        if buffer.is_null() {
            // SAFETY: `state` came from Box::into_raw just above and is not shared yet.
            drop(unsafe { Box::from_raw(state) });
            return None;
        }
        // SAFETY: `buffer` is an av_malloc'ed block of IO_BUFFER_BYTES that the context takes
        // over; `state` lives until `drop`, after the format context is closed.
        let ctx = unsafe { ffi::avio_alloc_context(buffer, IO_BUFFER_BYTES as c_int, 0, state as *mut c_void, Some(read_packet), None, Some(seek)) };
        if ctx.is_null() {
            // SAFETY: the context was not created, so the buffer and state are still ours.
            unsafe {
                ffi::av_free(buffer as *mut c_void);
                drop(Box::from_raw(state));
            }
            return None;
        }
        // SAFETY: `ctx` is a valid context we just allocated.
        unsafe { (*ctx).seekable = 0 };
        Some(BufferIo { ctx, state })
    }

    pub fn as_ptr(&self) -> *mut ffi::AVIOContext {
        self.ctx
    }
}

impl Drop for BufferIo {
    fn drop(&mut self) {
        // SAFETY: the format context using `ctx` was closed before (the owner drops it first);
        // FFmpeg may have replaced the buffer, so free the one the context holds now.
        unsafe {
            ffi::av_freep(&mut (*self.ctx).buffer as *mut *mut u8 as *mut c_void);
            ffi::avio_context_free(&mut self.ctx);
            drop(Box::from_raw(self.state));
        }
    }
}

unsafe extern "C" fn read_packet(opaque: *mut c_void, buf: *mut u8, size: c_int) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `opaque` is the `IoState` this context was created with, used by one thread;
        // `buf` holds `size` writable bytes.
        let (state, out) = unsafe { (&mut *(opaque as *mut IoState), std::slice::from_raw_parts_mut(buf, size.max(0) as usize)) };
        match state.reader.read(out) {
            Ok(0) => ffi::AVERROR_EOF,
            Ok(n) => n as c_int,
            Err(err) if err.kind() == ErrorKind::ConnectionAborted => ffi::AVERROR_EXIT,
            Err(_) => averror(libc::EIO),
        }
    }));
    result.unwrap_or(ffi::AVERROR_EXIT)
}

unsafe extern "C" fn seek(opaque: *mut c_void, offset: i64, whence: c_int) -> i64 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `read_packet`.
        let state = unsafe { &mut *(opaque as *mut IoState) };
        let buffer = state.reader.buffer();
        let final_len = match buffer.write_state() {
            WriteState::Finished => Some(buffer.written() as i64),
            WriteState::Aborted => return i64::from(ffi::AVERROR_EXIT),
            WriteState::Open => None,
        };
        if whence & ffi::AVSEEK_SIZE != 0 {
            return final_len.unwrap_or(i64::from(averror(libc::ENOSYS)));
        }
        let target = match whence & !ffi::AVSEEK_FORCE {
            libc::SEEK_SET => Some(offset),
            libc::SEEK_CUR => Some(state.reader.position() as i64 + offset),
            libc::SEEK_END => match final_len {
                Some(len) => Some(len + offset),
                None => return i64::from(averror(libc::ENOSYS)),
            },
            _ => None,
        };
        match target.and_then(|t| u64::try_from(t).ok()) {
            Some(t) => match state.reader.seek(SeekFrom::Start(t)) {
                Ok(pos) => pos as i64,
                Err(_) => i64::from(averror(libc::EIO)),
            },
            None => i64::from(averror(libc::EINVAL)),
        }
    }));
    result.unwrap_or(i64::from(ffi::AVERROR_EXIT))
}
