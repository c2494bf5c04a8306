//! A consortium CA kept in a directory, with an index of everything it issued.
//!
//! ```text
//! <dir>/ca.crt      the CA certificate (public)
//! <dir>/ca.key      the CA private key (0600)
//! <dir>/index.json  consortium, next CRL number, every issued certificate and its revocation
//! <dir>/crl.pem     the current CRL: written at init (empty) and on every revocation
//! ```
//!
//! Every change to `index.json` and `crl.pem` is atomic (temporary file + rename in the same
//! directory) and made under an exclusive `flock` on the directory, so two `tutela pki`
//! processes working on one CA do not lose each other's records.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::files::{self, FileMode};
use super::{
    CertificateAuthority, DEFAULT_CRL_NEXT_UPDATE_DAYS, IssuedCertificate, KeyAlgorithm,
    LeafOptions, PkiError, Revocation, Validity, canonical_reason, normalize_serial, rfc3339,
};
use crate::identity::{Identity, Principal, validate_segment};

/// The index format this code writes and reads.
const INDEX_VERSION: u32 = 1;

/// The CA's record of everything it issued (`index.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaIndex {
    pub version: u32,
    pub consortium: String,
    /// The number the next CRL will carry (CRL numbers only ever grow).
    pub next_crl_number: u64,
    pub certificates: Vec<IndexEntry>,
}

/// One issued certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Lowercase hex, no colons, no leading zero bytes.
    pub serial: String,
    /// The identity URI.
    pub identity: String,
    #[serde(with = "rfc3339_serde")]
    pub not_before: OffsetDateTime,
    #[serde(with = "rfc3339_serde")]
    pub not_after: OffsetDateTime,
    #[serde(default)]
    pub revocation: Option<IndexRevocation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRevocation {
    #[serde(with = "rfc3339_serde")]
    pub revoked_at: OffsetDateTime,
    /// One of [`super::REVOCATION_REASONS`], or none (unspecified).
    pub reason: Option<String>,
}

/// A consortium CA in a directory.
#[derive(Debug)]
pub struct CaDir {
    dir: PathBuf,
    ca: CertificateAuthority,
}

impl CaDir {
    pub const CERT_FILE: &'static str = "ca.crt";
    pub const KEY_FILE: &'static str = "ca.key";
    pub const INDEX_FILE: &'static str = "index.json";
    pub const CRL_FILE: &'static str = "crl.pem";

    /// Makes a new CA valid for `days` days in `dir` (created, mode 0700, if missing) and writes
    /// `ca.crt`, `ca.key`, an empty `index.json` and an empty `crl.pem`. Refuses, before writing
    /// anything, if any of those files exists, unless `force`.
    pub fn init(
        dir: &Path,
        consortium: &str,
        algorithm: KeyAlgorithm,
        days: u32,
        force: bool,
    ) -> Result<Self, PkiError> {
        validate_segment("consortium", consortium)?;
        let targets = [
            dir.join(Self::KEY_FILE),
            dir.join(Self::CERT_FILE),
            dir.join(Self::INDEX_FILE),
            dir.join(Self::CRL_FILE),
        ];
        files::refuse_existing(targets.iter().map(PathBuf::as_path), force)?;
        let ca =
            CertificateAuthority::create(consortium, algorithm, Validity::days_from_now(days))?;
        files::ensure_dir(dir, true)?;
        let store = CaDir {
            dir: dir.to_path_buf(),
            ca,
        };
        let _lock = store.lock()?;
        let mut index = CaIndex {
            version: INDEX_VERSION,
            consortium: consortium.to_string(),
            next_crl_number: 1,
            certificates: Vec::new(),
        };
        let crl = store.next_crl(&mut index, DEFAULT_CRL_NEXT_UPDATE_DAYS)?;
        files::write_file(
            &store.key_path(),
            store.ca.key_pem().as_bytes(),
            FileMode::Private,
            force,
        )?;
        files::write_file(
            &store.cert_path(),
            store.ca.cert_pem().as_bytes(),
            FileMode::Public,
            force,
        )?;
        files::write_file(
            &store.index_path(),
            &index_json(&index)?,
            FileMode::Public,
            force,
        )?;
        files::write_file(&store.crl_path(), crl.as_bytes(), FileMode::Public, force)?;
        Ok(store)
    }

    /// Opens the CA in `dir`: loads and checks its certificate, key and index.
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        for name in [Self::CERT_FILE, Self::KEY_FILE, Self::INDEX_FILE] {
            let path = dir.join(name);
            if !path.exists() {
                return Err(PkiError::NotACaDir {
                    dir: dir.to_path_buf(),
                    missing: path,
                });
            }
        }
        let cert_path = dir.join(Self::CERT_FILE);
        let key_path = dir.join(Self::KEY_FILE);
        let cert_pem = files::read_text(&cert_path)?;
        let key_pem = files::read_text(&key_path)?;
        let ca =
            CertificateAuthority::from_pem(&cert_pem, &key_pem).map_err(|e| PkiError::InFiles {
                paths: format!("{} and {}", cert_path.display(), key_path.display()),
                cause: Box::new(e),
            })?;
        let store = CaDir {
            dir: dir.to_path_buf(),
            ca,
        };
        store.index()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(Self::CERT_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(Self::KEY_FILE)
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join(Self::INDEX_FILE)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(Self::CRL_FILE)
    }

    /// Reads and checks `index.json`.
    pub fn index(&self) -> Result<CaIndex, PkiError> {
        let path = self.index_path();
        let text = files::read_text(&path)?;
        let bad = |why: String| PkiError::BadIndex {
            path: path.clone(),
            why,
        };
        let index: CaIndex = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if index.version != INDEX_VERSION {
            return Err(bad(format!(
                "it has format version {}, this tutela reads version {INDEX_VERSION}",
                index.version
            )));
        }
        if index.consortium != self.ca.consortium() {
            return Err(bad(format!(
                "it belongs to consortium {:?} but {} to consortium {:?}",
                index.consortium,
                self.cert_path().display(),
                self.ca.consortium()
            )));
        }
        Ok(index)
    }

    /// Issues a certificate and key for `principal` and records it in the index.
    pub fn issue(
        &self,
        principal: &Principal,
        opts: &LeafOptions,
    ) -> Result<IssuedCertificate, PkiError> {
        let issued = self.ca.issue(principal, opts)?;
        self.record(&issued.serial_hex, &issued.identity, &opts.validity)?;
        Ok(issued)
    }

    /// Signs a CSR for `expected` (see [`CertificateAuthority::sign_csr`]) and records the
    /// certificate in the index. Returns (cert_pem, serial_hex).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &Principal,
        validity: Validity,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
    ) -> Result<(String, String), PkiError> {
        let identity = self.ca.identity_for(expected)?;
        let (cert_pem, serial) =
            self.ca
                .sign_csr(csr_pem, expected, validity, dns_names, ip_addresses)?;
        self.record(&serial, &identity, &validity)?;
        Ok((cert_pem, serial))
    }

    fn record(
        &self,
        serial: &str,
        identity: &Identity,
        validity: &Validity,
    ) -> Result<(), PkiError> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        index.certificates.push(IndexEntry {
            serial: serial.to_string(),
            identity: identity.uri(),
            not_before: validity.not_before,
            not_after: validity.not_after,
            revocation: None,
        });
        self.write_index(&index)
    }

    /// Revokes the certificate with `serial` (hex; colons and `0x` accepted) and refreshes
    /// `crl.pem`. Returns the revoked certificate's index entry.
    pub fn revoke(&self, serial: &str, reason: Option<&str>) -> Result<IndexEntry, PkiError> {
        let serial = normalize_serial(serial)?;
        let reason = reason.map(canonical_reason).transpose()?;
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let entry = index
            .certificates
            .iter_mut()
            .find(|e| e.serial == serial)
            .ok_or_else(|| PkiError::UnknownSerial {
                serial: serial.clone(),
                index: self.index_path(),
            })?;
        if let Some(done) = &entry.revocation {
            return Err(PkiError::AlreadyRevoked {
                serial,
                identity: entry.identity.clone(),
                revoked_at: rfc3339(done.revoked_at),
            });
        }
        let now = OffsetDateTime::now_utc();
        entry.revocation = Some(IndexRevocation {
            revoked_at: now - Duration::nanoseconds(i64::from(now.nanosecond())),
            reason: reason.map(str::to_string),
        });
        let revoked = entry.clone();
        let crl = self.next_crl(&mut index, DEFAULT_CRL_NEXT_UPDATE_DAYS)?;
        self.write_index(&index)?;
        files::replace_atomically(&self.crl_path(), crl.as_bytes(), FileMode::Public)?;
        Ok(revoked)
    }

    /// Signs a new CRL of every revoked certificate, current for `next_update_days` days,
    /// refreshes `crl.pem` with it and writes it to `out` too (refusing an existing `out`
    /// unless `force`; `out`'s directory is created if missing). Returns the CRL.
    pub fn write_crl(
        &self,
        out: &Path,
        next_update_days: u32,
        force: bool,
    ) -> Result<String, PkiError> {
        files::refuse_existing([out], force)?;
        files::ensure_parent(out)?;
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let crl = self.next_crl(&mut index, next_update_days)?;
        self.write_index(&index)?;
        files::replace_atomically(&self.crl_path(), crl.as_bytes(), FileMode::Public)?;
        files::write_file(out, crl.as_bytes(), FileMode::Public, force)?;
        Ok(crl)
    }

    /// Signs the CRL numbered `index.next_crl_number` and advances the number (in memory).
    fn next_crl(&self, index: &mut CaIndex, next_update_days: u32) -> Result<String, PkiError> {
        let revoked: Vec<Revocation> = index
            .certificates
            .iter()
            .filter_map(|e| {
                e.revocation.as_ref().map(|r| Revocation {
                    serial_hex: e.serial.clone(),
                    revoked_at: r.revoked_at,
                    reason: r.reason.clone(),
                })
            })
            .collect();
        let validity = Validity::days_from_now(next_update_days.max(1));
        let this_update = validity.not_before + Validity::CLOCK_SKEW;
        let crl = self.ca.crl_pem(
            &revoked,
            index.next_crl_number,
            this_update,
            validity.not_after,
        )?;
        index.next_crl_number += 1;
        Ok(crl)
    }

    fn write_index(&self, index: &CaIndex) -> Result<(), PkiError> {
        files::replace_atomically(&self.index_path(), &index_json(index)?, FileMode::Public)
    }

    /// An exclusive lock on the CA directory, released when the returned file is dropped.
    fn lock(&self) -> Result<File, PkiError> {
        let dir = File::open(&self.dir).map_err(|e| PkiError::io(&self.dir, e))?;
        dir.lock().map_err(|e| PkiError::io(&self.dir, e))?;
        Ok(dir)
    }
}

fn index_json(index: &CaIndex) -> Result<Vec<u8>, PkiError> {
    let mut json = serde_json::to_vec_pretty(index).map_err(|e| PkiError::Parse {
        what: "the CA index".to_string(),
        why: e.to_string(),
    })?;
    json.push(b'\n');
    Ok(json)
}

mod rfc3339_serde {
    use serde::{Deserialize, Deserializer, Serializer, de, ser};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format(&Rfc3339).map_err(ser::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339).map_err(de::Error::custom)
    }
}
