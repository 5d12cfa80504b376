//! Connections to PostgreSQL: parsing the connection string, the shared pool, the
//! dedicated connections that must not be pooled, TLS, and the schema migrations.

mod connect;
mod migrate;
mod tls;
mod transaction;
mod uninstall;

pub use connect::{connect_dedicated, DatabaseTarget, Pool};
pub use migrate::{migrate, MigrationReport};
pub use transaction::{begin_bounded, IDLE_IN_TRANSACTION_TIMEOUT};
pub use uninstall::{uninstall, UninstallOptions, UninstallReport};
