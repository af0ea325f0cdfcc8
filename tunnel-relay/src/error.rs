//! Library error types (one enum per concern, a message on every variant).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::wire::{FrameError, Rejection};

/// Reading or writing the state directory (keys, certificates, SQLite).
#[derive(Debug, Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file does not hold a base64 32-byte key.
    #[error("{}: not a base64 X25519 private key (32 bytes); delete it to create a new identity", .0.display())]
    BadKeyFile(PathBuf),
    /// A state file is malformed.
    #[error("{}: {msg}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The SQLite registry failed.
    #[cfg(feature = "server")]
    #[error("registry database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The PostgreSQL store failed (unreachable, or a statement failed).
    #[cfg(feature = "server")]
    #[error("store (PostgreSQL): {0}")]
    Pg(String),
    /// The PostgreSQL store's schema is newer than this relay.
    #[cfg(feature = "server")]
    #[error("store (PostgreSQL): schema version {found} is newer than this relay knows ({known}): upgrade this relay (a newer relay migrated the database)")]
    SchemaTooNew {
        /// The database's version.
        found: i32,
        /// The newest this build knows.
        known: i32,
    },
    /// No such token or node.
    #[error("{0}")]
    NotFound(String),
    /// The client state has no relay yet.
    #[error("no relay known in {}: run with --token first (`weft login --token ...`, or `tunnel-relay expose --token ...` on a worker)", .0.display())]
    NotJoined(PathBuf),
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(String),
}

impl StateError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> StateError {
        StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub use weft_proto::token::TokenError;

/// A relay configuration file that cannot be used.
#[cfg(feature = "server")]
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is invalid (message carries line and column).
    #[error("{origin}: {message}")]
    Parse {
        /// File name or `<string>`.
        origin: String,
        /// toml's message with position.
        message: String,
    },
    /// A value is out of range.
    #[error("{origin}: {message}")]
    Invalid {
        /// File name or `<string>`.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Failures of the tunnel protocol on one connection or stream.
#[derive(Debug, Error)]
pub enum ProtoError {
    /// Framing or decoding.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The Noise handshake failed (wrong key, tampered or unbound connection).
    #[error("noise handshake failed: {0}")]
    Noise(#[from] snow::Error),
    /// The relay connection (QUIC, or the TCP/TLS fallback) failed.
    #[error("relay connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The TLS exporter value could not be derived.
    #[error("tls exporter unavailable")]
    Exporter,
    /// The peer sent a message that does not belong here.
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// The peer refused.
    #[error("refused: {0}")]
    Rejected(Rejection),
    /// A step took too long.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The TCP/TLS fallback could not be set up (TCP, TLS, proxy or HTTP upgrade).
    #[error("tcp/tls: {0}")]
    Tcp(String),
}

/// Errors of the relay server shell.
#[cfg(feature = "server")]
#[derive(Debug, Error)]
pub enum RelayError {
    /// State directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Binding the UDP socket.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// Another live relay of the fleet goes by this relay's name.
    #[error("relay name {name:?} is taken: a live relay of the fleet at {addrs} uses it; give each relay its own `name` in its config (a relay restarted with new addresses can start again 3 s after the old one stopped)")]
    NameInUse {
        /// The name.
        name: String,
        /// The other relay's addresses.
        addrs: String,
    },
    /// The persisted mesh records do not fit the `[mesh]` configuration.
    #[error("mesh node records in registry.sqlite do not fit the [mesh] config: {source}; restore the previous [mesh] pools, or delete the mesh_nodes table to renumber every node")]
    MeshRestore {
        /// What the coordinator refused.
        source: crate::coord::CoordError,
    },
}

/// Errors of the client side (login, expose, connect, forward).
#[derive(Debug, Error)]
pub enum ClientError {
    /// State directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// The relay (or the worker) refused; the reason is for the user.
    #[error("relay refused: {0}")]
    Rejected(Rejection),
    /// No relay address worked.
    #[error("cannot reach the relay at {addrs}: {last}")]
    Unreachable {
        /// The addresses tried.
        addrs: String,
        /// The last error.
        last: String,
    },
    /// Protocol failure.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// Local I/O (binding a socket, stdio).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    /// How this error reads to the link core: a refusal (permanent or not
    /// by [`crate::link::is_permanent`]), unusable local state (permanent),
    /// or something another try may fix.
    pub fn failure(&self) -> crate::link::Failure {
        use crate::link::Failure;
        match self {
            ClientError::Rejected(r) | ClientError::Proto(ProtoError::Rejected(r)) => {
                Failure::refused(r)
            }
            ClientError::State(_) => Failure::Local(self.to_string()),
            _ => Failure::Transient(self.to_string()),
        }
    }
}
