//! outbox-relay: moves transactional-outbox rows from PostgreSQL to Kafka,
//! at-least-once and in per-aggregate order.
//!
//! `main.rs` is a thin shell over these modules; tests drive the same entry points.

pub mod app;
pub mod cli;
pub mod config;
pub mod database;
pub mod db;
pub mod dead_letter;
pub mod event;
pub mod health;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod retry;
pub mod sink;
pub mod source;
pub mod telemetry;
