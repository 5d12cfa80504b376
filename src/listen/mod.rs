//! The listener: one dedicated connection that runs `LISTEN`, arms the wake-up flag
//! that writers read, and signals the service when to drain the queue.

mod debounce;
mod session;
mod warn_limit;

pub use debounce::{Debounce, Settled};
pub use session::{validate_channel, ListenerCounters, ListenerSession};
pub use warn_limit::WarnLimiter;
