//! Waking the Raft tick thread from the event loop without letting go of the GIL.
//!
//! PySyncObj wakes its tick thread (asleep in `poll`) by writing a byte to a pipe with
//! `os.write`, which releases the GIL around the syscall: the woken tick thread takes the GIL
//! at once and the event loop that proposed waits to get it back — ~400 µs per proposal under
//! `cProfile`, in the middle of a batch of requests. The write itself takes about a
//! microsecond and never blocks (the pipe is non-blocking), so it is made here with the GIL
//! held; the tick thread runs when the loop next lets go of it.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;

use pyo3::prelude::*;

/// Writes one byte to the non-blocking pipe `fd`, holding the GIL. False: the pipe is full,
/// so its reader has bytes waiting and wakes anyway.
#[pyfunction]
pub fn wake_pipe(fd: i32) -> PyResult<bool> {
    if fd < 0 {
        let message = format!("wake_pipe: {fd} is not a file descriptor");
        return Err(pyo3::exceptions::PyValueError::new_err(message));
    }
    // SAFETY: the File only borrows `fd` (ManuallyDrop: it is never closed here, the pipe
    // belongs to PySyncObj's notifier); a descriptor closed meanwhile fails the write (EBADF).
    let mut pipe = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    loop {
        match pipe.write(b"o") {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
