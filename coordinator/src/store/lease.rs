//! The leader lease of coordinators sharing one PostgreSQL database (`[ha]` of coordinator.toml),
//! its fencing token, and the files a new leader copies from the database.
//!
//! One row of `coordinator_lease` names the holder, its address for nodes, the **epoch** (one more
//! at every change of holder) and when the lease expires, on the database's clock. A coordinator
//! calls [`Store::acquire_lease`] every `renew_every_secs`: in one transaction, with the row
//! locked (`SELECT … FOR UPDATE`), the holder renews, and anyone takes an expired lease at the
//! next epoch.
//!
//! **Fencing**: a leader's store is [`Store::fenced`] with its epoch; every write transaction
//! (`begin_write`) first reads the lease row with a shared lock (`FOR SHARE`) and writes nothing
//! unless the epoch is still its own. A takeover's `FOR UPDATE` waits for such a transaction to
//! end, and a write that starts after the takeover sees the new epoch: so an old leader that was
//! paused past its lease (a long GC, a frozen VM) and wakes up cannot record a round, move a job
//! or record an attempt, whatever it believes.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::any::Any;
use sqlx::{Row, Transaction};

use super::{Backend, Result, Store, StoreError, db};

/// The lease's row (one lease per database today).
pub const LEASE_NAME: &str = "coordinator";

/// Milliseconds since the epoch on the database's clock: lease times never mix two machines'
/// clocks.
const DB_NOW_MS: &str = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// Who holds (or last held) the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    pub instance_id: String,
    /// Where nodes reach it (its `[ha] advertise_address`), when it said.
    pub address: Option<String>,
    pub epoch: i64,
    /// On the database's clock.
    pub expires_at_ms: i64,
}

/// What [`Store::acquire_lease`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// This coordinator holds the lease at `epoch`: renewed (`taken` false) or just taken,
    /// expired from another holder or never held (`taken` true).
    Leader { epoch: i64, taken: bool },
    /// Another coordinator holds an unexpired lease.
    Follower { leader: LeaseHolder },
}

/// The lease epoch a leader's writes are fenced with; 0 while it holds none. Shared by every
/// clone of the store it was given to.
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<AtomicI64>);

impl Fence {
    pub fn set(&self, epoch: i64) {
        self.0.store(epoch, Ordering::SeqCst);
    }

    /// No lease: every fenced write is refused.
    pub fn clear(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    pub fn epoch(&self) -> Option<i64> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            e => Some(e),
        }
    }
}

/// Refuses the write transaction `tx` unless `fence`'s epoch is the lease's (see the module
/// documentation). The row stays share-locked until `tx` ends.
pub(super) async fn check_fence(
    tx: &mut Transaction<'static, Any>,
    fence: &Fence,
    op: &str,
) -> Result<()> {
    let Some(epoch) = fence.epoch() else {
        return Err(StoreError::NotLeader { op: op.to_string() });
    };
    let row = sqlx::query("SELECT epoch, holder FROM coordinator_lease WHERE name = $1 FOR SHARE")
        .bind(LEASE_NAME)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db(format!("{op}: check the leader lease")))?;
    let (current, holder): (i64, String) = match row {
        Some(r) => (
            r.try_get(0).map_err(db(format!("{op}: read the lease")))?,
            r.try_get(1).map_err(db(format!("{op}: read the lease")))?,
        ),
        None => (0, String::new()),
    };
    if current != epoch {
        return Err(StoreError::Fenced {
            op: op.to_string(),
            epoch,
            current,
            holder,
        });
    }
    Ok(())
}

impl Store {
    /// This store with every write transaction fenced by `fence`'s epoch (see the module
    /// documentation); clones share the fence.
    pub fn fenced(&self, fence: Fence) -> Store {
        Store {
            fence: Some(fence),
            ..self.clone()
        }
    }

    fn require_postgres(&self) -> Result<()> {
        if self.backend != Backend::Postgres {
            return Err(StoreError::LeaseNeedsPostgres {
                backend: self.backend,
                location: self.location.clone(),
            });
        }
        Ok(())
    }

    /// Takes or renews the leader lease for `instance_id` (see the module documentation), in one
    /// transaction with the lease row locked. `held`: the epoch this instance holds, if it
    /// believes it holds one; the lease is renewed only at that epoch, and taken (at the next
    /// epoch) only once expired, so an instance restarted under the same id waits out its old
    /// lease like anyone else.
    pub async fn acquire_lease(
        &self,
        instance_id: &str,
        address: Option<&str>,
        ttl: Duration,
        held: Option<i64>,
    ) -> Result<LeaseOutcome> {
        self.require_postgres()?;
        let op = format!("acquire the leader lease as {instance_id}");
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db(format!("{op}: begin transaction")))?;
        let now: i64 = sqlx::query_scalar(DB_NOW_MS)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(format!("{op}: read the database clock")))?;
        // The row exists from the first try on (expired, epoch 0, held by no one).
        sqlx::query(
            "INSERT INTO coordinator_lease (name, holder, address, epoch, expires_at_ms, renewed_at_ms)
             VALUES ($1, '', NULL, 0, 0, 0) ON CONFLICT (name) DO NOTHING",
        )
        .bind(LEASE_NAME)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: create the lease row")))?;
        let row = sqlx::query(
            "SELECT holder, address, epoch, expires_at_ms FROM coordinator_lease
             WHERE name = $1 FOR UPDATE",
        )
        .bind(LEASE_NAME)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(format!("{op}: lock the lease row")))?;
        let current = holder_from_row(&row).map_err(db(format!("{op}: read the lease row")))?;
        let expires = now + ttl.as_millis() as i64;
        let outcome = if current.instance_id == instance_id && held == Some(current.epoch) {
            LeaseOutcome::Leader {
                epoch: current.epoch,
                taken: false,
            }
        } else if current.expires_at_ms <= now {
            LeaseOutcome::Leader {
                epoch: current.epoch + 1,
                taken: true,
            }
        } else {
            return Ok(LeaseOutcome::Follower { leader: current });
        };
        let LeaseOutcome::Leader { epoch, .. } = outcome else {
            return Ok(outcome);
        };
        sqlx::query(
            "UPDATE coordinator_lease
             SET holder = $1, address = $2, epoch = $3, expires_at_ms = $4, renewed_at_ms = $5
             WHERE name = $6",
        )
        .bind(instance_id)
        .bind(address)
        .bind(epoch)
        .bind(expires)
        .bind(now)
        .bind(LEASE_NAME)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: write the lease")))?;
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(outcome)
    }

    /// Gives the lease up at once (a clean shutdown), if `instance_id` still holds it at
    /// `epoch`: a follower takes it at its next try instead of after the TTL.
    pub async fn release_lease(&self, instance_id: &str, epoch: i64) -> Result<()> {
        self.require_postgres()?;
        sqlx::query(
            "UPDATE coordinator_lease SET expires_at_ms = 0
             WHERE name = $1 AND holder = $2 AND epoch = $3",
        )
        .bind(LEASE_NAME)
        .bind(instance_id)
        .bind(epoch)
        .execute(&self.pool)
        .await
        .map_err(db(format!("release the leader lease of {instance_id}")))?;
        Ok(())
    }

    /// The lease as it stands; `None` before anyone tried to take it.
    pub async fn lease(&self) -> Result<Option<LeaseHolder>> {
        self.require_postgres()?;
        let row = sqlx::query(
            "SELECT holder, address, epoch, expires_at_ms FROM coordinator_lease WHERE name = $1",
        )
        .bind(LEASE_NAME)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read the leader lease"))?;
        row.as_ref()
            .map(holder_from_row)
            .transpose()
            .map_err(db("read the leader lease"))
    }

    /// Whether this (fenced) store's epoch is still the lease's: checked before an audit append,
    /// so that an old leader does not append what the new one records. Unfenced: always true.
    pub async fn still_leader(&self) -> Result<bool> {
        let Some(fence) = &self.fence else {
            return Ok(true);
        };
        let Some(epoch) = fence.epoch() else {
            return Ok(false);
        };
        Ok(self.lease().await?.is_some_and(|l| l.epoch == epoch))
    }

    /// Keeps a copy of `bytes` under `key` for a leader on another machine (see the migration
    /// `0005_leader_lease.sql`); a fenced write. Writing the same key again is a no-op.
    pub async fn replicate_file(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let op = format!("replicate {key}");
        let mut tx = self.begin_write(&op).await?;
        sqlx::query(
            "INSERT INTO replicated_files (key, sha256, bytes, recorded_at_ms)
             VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(super::sha256_hex(bytes))
        .bind(bytes)
        .bind(super::now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db(&op))?;
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(())
    }

    /// The copy kept under `key`, checked against its SHA-256; `None` if there is none.
    pub async fn replicated_file(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT sha256, bytes FROM replicated_files WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db(format!("read the replicated {key}")))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let sha: String = row
            .try_get(0)
            .map_err(db(format!("read the replicated {key}")))?;
        let bytes: Vec<u8> = row
            .try_get(1)
            .map_err(db(format!("read the replicated {key}")))?;
        let actual = super::sha256_hex(&bytes);
        if actual != sha {
            return Err(StoreError::Corrupt {
                what: format!("replicated file {key}"),
                problem: format!("its bytes digest to {actual}, not the {sha} recorded"),
            });
        }
        Ok(Some(bytes))
    }
}

fn holder_from_row(row: &sqlx::any::AnyRow) -> std::result::Result<LeaseHolder, sqlx::Error> {
    Ok(LeaseHolder {
        instance_id: row.try_get(0)?,
        address: row.try_get(1)?,
        epoch: row.try_get(2)?,
        expires_at_ms: row.try_get(3)?,
    })
}
