//! Bounded reading of a site's text files: no line, record or field may make a reader hold more
//! than a fixed amount of memory, whatever the file holds.
//!
//! A reader that buffers a line (JSON Lines' `read_line`) or a record (the `csv` crate) grows its
//! buffer to fit: a 1 GB file without a newline would be read whole into memory before any check
//! could refuse it. [`BoundedReader`] sits *under* that buffering and fails the read as soon as the
//! current physical line, or the current record (a CSV record may span lines inside quotes),
//! passes its limit, so the buffers above it never hold more than the limit plus one read-ahead
//! block. The error is an `io::Error` carrying [`TooLong`], which the readers turn into their own
//! error naming the file and line.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The longest line (and CSV record) a site's data file may have: 1 MiB.
pub const MAX_LINE_BYTES: u64 = 1 << 20;
/// The longest single field (a CSV cell, a JSON value's text): 256 KiB.
pub const MAX_FIELD_BYTES: usize = 256 << 10;

/// What passed its limit, and on which 1-based line it started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {line} is longer than the limit of {max} bytes")]
pub struct TooLong {
    /// `line` or `the record at line`.
    pub what: &'static str,
    pub line: u64,
    pub max: u64,
}

impl TooLong {
    /// The [`TooLong`] inside an I/O error, if that is what the error is.
    pub fn from_io(e: &io::Error) -> Option<&TooLong> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<TooLong>())
    }
}

/// A handle the record reader uses to say "a record ended here" (see [`BoundedReader::new`]).
#[derive(Clone, Debug, Default)]
pub struct RecordMark(Arc<AtomicU64>);

impl RecordMark {
    /// The bytes read since the last mark restart counting from 0.
    pub fn record_done(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Fails a read once a physical line, or the bytes since the last [`RecordMark::record_done`],
/// exceed `max_line` bytes.
#[derive(Debug)]
pub struct BoundedReader<R> {
    inner: R,
    max_line: u64,
    /// Bytes since the last `\n`.
    in_line: u64,
    /// Completed lines so far (the current line is `lines + 1`).
    lines: u64,
    record: RecordMark,
    /// Line at which the current record started.
    record_line: u64,
}

impl<R: Read> BoundedReader<R> {
    /// Wraps `inner`; the returned mark is for the reader that splits records.
    pub fn new(inner: R, max_line: u64) -> (Self, RecordMark) {
        let record = RecordMark::default();
        let reader = BoundedReader {
            inner,
            max_line,
            in_line: 0,
            lines: 0,
            record: record.clone(),
            record_line: 1,
        };
        (reader, record)
    }

    fn too_long(what: &'static str, line: u64, max: u64) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, TooLong { what, line, max })
    }
}

impl<R: Read> Read for BoundedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let in_record = self.record.0.load(Ordering::Relaxed);
        if in_record == 0 {
            self.record_line = self.lines + 1;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                self.lines += 1;
                self.in_line = 0;
            } else {
                self.in_line += 1;
                if self.in_line > self.max_line {
                    return Err(Self::too_long("line", self.lines + 1, self.max_line));
                }
            }
        }
        let in_record = in_record.saturating_add(n as u64);
        self.record.0.store(in_record, Ordering::Relaxed);
        // The buffers above may hold one read-ahead block besides the record: allow for it.
        if in_record > self.max_line.saturating_add(buf.len() as u64) {
            return Err(Self::too_long(
                "the record at line",
                self.record_line,
                self.max_line,
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_fails_the_read_naming_its_line() {
        let text = format!("ok\n{}\n", "x".repeat(100));
        let (mut r, _) = BoundedReader::new(text.as_bytes(), 50);
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        let too_long = TooLong::from_io(&e).unwrap();
        assert_eq!(too_long.line, 2);
        assert!(out.len() < 100);
        let (mut r, _) = BoundedReader::new("short\nlines\n".as_bytes(), 50);
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "short\nlines\n");
    }

    #[test]
    fn a_record_over_many_short_lines_fails_unless_marked() {
        let text = "ab\n".repeat(1000);
        let (r, _) = BoundedReader::new(text.as_bytes(), 10);
        let mut r = io::BufReader::with_capacity(4, r);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        let (mut r, mark) = BoundedReader::new(text.as_bytes(), 10);
        let mut buf = [0u8; 3];
        for _ in 0..1000 {
            r.read_exact(&mut buf).unwrap();
            mark.record_done();
        }
    }
}
