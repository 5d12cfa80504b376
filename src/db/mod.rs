//! Connections to PostgreSQL: parsing the connection string, the shared pool, the
//! dedicated connections that must not be pooled, TLS, and the schema migrations.

mod connect;
mod migrate;
mod tls;

pub use connect::{connect_dedicated, DatabaseTarget, Pool};
pub use migrate::{migrate, MigrationReport};
