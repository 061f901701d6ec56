//! Local state in redb: the peer's identity key, so that a restarted peer
//! keeps its peer id, and (through [`crate::ledger::outbox`], which shares the
//! database) the ledger outbox.

use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");
const KEYPAIR: &str = "ed25519-keypair";

/// Why local state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {source}: choose another with --data-dir")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("the state database {path} is in use: is another node using this --data-dir? Stop it or choose another")]
    InUse { path: PathBuf },
    #[error(
        "cannot open the state database {path}: {source}: it may be damaged or from another version; move the data \
         directory aside (the peer then starts with a new identity) or choose another --data-dir"
    )]
    Open { path: PathBuf, source: Box<redb::DatabaseError> },
    #[error("state database {path}: {source}")]
    Db { path: PathBuf, source: Box<redb::Error> },
    #[error("the identity key in {path} is corrupt ({reason}): move the data directory aside to start as a new peer")]
    CorruptKey { path: PathBuf, reason: String },
}

/// The node's local database.
#[derive(Debug)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir { path: dir.to_owned(), source })?;
        let path = dir.join("node.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.clone() },
            e => StoreError::Open { path: path.clone(), source: Box::new(e) },
        })?;
        Ok(Self { db: Arc::new(db), path })
    }

    /// The database, shared with the other owners of local state.
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// Where the database lives, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db { path: self.path.clone(), source: Box::new(e.into()) }
    }

    /// The persisted identity, created on first use.
    pub fn identity(&self) -> Result<Keypair, StoreError> {
        let read = self.db.begin_read().map_err(|e| self.db_err(e))?;
        match read.open_table(IDENTITY) {
            Ok(table) => {
                if let Some(bytes) = table.get(KEYPAIR).map_err(|e| self.db_err(e))? {
                    return Keypair::from_protobuf_encoding(bytes.value())
                        .map_err(|e| StoreError::CorruptKey { path: self.path.clone(), reason: e.to_string() });
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.db_err(e)),
        }
        drop(read);
        let key = Keypair::generate_ed25519();
        let bytes = key.to_protobuf_encoding().expect("ed25519 keys encode");
        let write = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = write.open_table(IDENTITY).map_err(|e| self.db_err(e))?;
            table.insert(KEYPAIR, bytes.as_slice()).map_err(|e| self.db_err(e))?;
        }
        write.commit().map_err(|e| self.db_err(e))?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("dtrain-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Store::open(&dir).unwrap().identity().unwrap();
        let again = Store::open(&dir).unwrap().identity().unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
