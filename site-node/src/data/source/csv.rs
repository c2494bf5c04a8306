//! CSV with a header line (gzip-compressed when the name ends in `.gz`), streamed: one record in
//! memory at a time, and a line, record or field past the readers' limit
//! ([`tutela_privacy::anonymize::bounded`]) fails the read before the csv crate's buffers grow to
//! hold it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use tutela_privacy::anonymize::bounded::{
    BoundedReader, MAX_FIELD_BYTES, MAX_LINE_BYTES, RecordMark, TooLong,
};

use super::{Record, RecordSource};
use crate::data::DataError;

/// A CSV file's records.
pub struct CsvSource<'a> {
    origin: PathBuf,
    reader: csv::Reader<BufReader<BoundedReader<Box<dyn Read + 'a>>>>,
    record_mark: RecordMark,
    header: Vec<String>,
    record: csv::StringRecord,
    last_line: u64,
}

impl<'a> CsvSource<'a> {
    /// Opens a file and reads its header line.
    pub fn open(path: &Path) -> Result<CsvSource<'static>, DataError> {
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
        } else {
            Box::new(file)
        };
        CsvSource::new(reader, path)
    }

    /// Reads CSV text from any reader; `origin` names it in errors.
    pub fn new(reader: Box<dyn Read + 'a>, origin: &Path) -> Result<CsvSource<'a>, DataError> {
        let (bounded, record_mark) = BoundedReader::new(reader, MAX_LINE_BYTES);
        let reader = csv::ReaderBuilder::new()
            // The header is read as an ordinary record so that its line number and field count
            // are checked the same way as the data's.
            .has_headers(false)
            // Field counts are checked by the reader of records, to name the line and both counts.
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(BufReader::new(bounded));
        let mut source = CsvSource {
            origin: origin.to_path_buf(),
            reader,
            record_mark,
            header: Vec::new(),
            record: csv::StringRecord::new(),
            last_line: 0,
        };
        if !source.read()? {
            return Err(DataError::EmptyFile {
                path: origin.to_path_buf(),
            });
        }
        source.header = source.record.iter().map(str::to_owned).collect();
        Ok(source)
    }

    /// Reads the next record into `self.record`; `false` at the end.
    fn read(&mut self) -> Result<bool, DataError> {
        let fallback = self.last_line + 1;
        let more = self
            .reader
            .read_record(&mut self.record)
            .map_err(|e| csv_error(&self.origin, fallback, e))?;
        if !more {
            return Ok(false);
        }
        self.record_mark.record_done();
        let line = self.record.position().map_or(fallback, |p| p.line());
        self.last_line = line;
        if self.record.iter().any(|f| f.len() > MAX_FIELD_BYTES) {
            return Err(DataError::TooLong {
                path: self.origin.clone(),
                line,
                what: "a field",
                max: MAX_FIELD_BYTES as u64,
            });
        }
        Ok(true)
    }
}

fn csv_error(path: &Path, line: u64, source: csv::Error) -> DataError {
    // An I/O error (a truncated gzip stream, say) is about the file, not about a line; a line or
    // record past the limit is about its line.
    if let csv::ErrorKind::Io(io) = source.kind() {
        if let Some(t) = TooLong::from_io(io) {
            return DataError::TooLong {
                path: path.to_path_buf(),
                line: t.line,
                what: "the line or record",
                max: t.max,
            };
        }
        let message = source.to_string();
        return DataError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(message),
        };
    }
    let line = source
        .position()
        .map(|p| p.line())
        .filter(|&l| l > 0)
        .unwrap_or(line);
    DataError::Csv {
        path: path.to_path_buf(),
        line,
        source,
    }
}

impl RecordSource for CsvSource<'_> {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_record(&mut self) -> Result<Option<(u64, Record<'_>)>, DataError> {
        if !self.read()? {
            return Ok(None);
        }
        Ok(Some((self.last_line, Record::Text(&self.record))))
    }
}
