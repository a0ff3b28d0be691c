//! What every long-running tapgate process shares, whatever its role: the wall clock in the
//! protocol's unit, the one retry schedule, supervised background tasks with their health, a
//! lock-free duration histogram, (feature `redis`) one way to connect to a single Redis or a Redis
//! Cluster, and (feature `ops`) the operators' HTTP endpoint. It links neither QUIC nor the gateway, so the settlers and the load tools can
//! use it.

pub mod clock;
pub mod health;
pub mod histogram;
#[cfg(feature = "ops")]
pub mod ops;
mod position;
#[cfg(feature = "redis")]
pub mod redis_target;
pub mod retry;
pub mod sync;

pub use clock::now_ms;
