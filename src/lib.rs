//! regmux answers the OCI Distribution (Docker Registry v2) pull API in front of several registries.
//!
//! A request passes these stages, each in its own module:
//!
//! - [`server`] accepts connections (HTTP/1.1 and h2c on one port), enforces connection limits and
//!   drains gracefully on stop.
//! - [`proxy`] is the request path, top to bottom: the method gate and `/v2/`, parsing the path into a
//!   typed [`registry::RegistryPath`] (names and digests validated by the spec grammar; nothing raw goes
//!   further), routing, trying backends, streaming, and the one log event per request.
//! - [`record`] ends every request: one log event, metrics, and a ledger event when the route's
//!   migration target did not serve it.
//! - [`route`] picks the route: containerd's `ns` parameter, a registry-name path prefix, the `Host`
//!   header, the default route.
//! - [`backend`] is one upstream registry: its path prefix, its authentication (Basic, or bearer tokens
//!   cached per scope) and a fetch that answers Found, Missing or Failed, over a pooled hyper client
//!   whose read buffers are bounded (`backend::transport`).
//! - [`body`] streams a backend's body to the client with back-pressure, hashing blobs as they pass and
//!   holding back the last chunk until the digest matches.
//! - [`listing`] merges `tags/list` and `_catalog` across backends.
//! - [`ledger`] records, off the request path, what each route's migration target could not serve
//!   and how much traffic each backend carried, in SQLite (one replica) or PostgreSQL (a fleet);
//!   `regmux misses` reports from it.
//! - [`clientauth`] checks client credentials against an htpasswd file when one is configured.
//! - [`respond`] is the only place that builds error responses and filters backend headers.
//! - [`migrate`] drives the migration: `inventory` of a registry, `migrate` into the target.
//! - [`warm`] warms a route's target in the background from real traffic (`warm = true`).
//! - [`admin`] serves `/metrics`, `/healthz`, `/readyz` and the [`ui`] page on a separate port.
//! - [`registry`] is the wire protocol without I/O; [`config`] the TOML schema and its validation;
//!   [`app`] the shared state that a reload swaps.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backend;
pub mod body;
pub mod clientauth;
pub mod clientconfig;
pub mod config;
pub mod ledger;
pub mod listing;
pub mod metrics;
pub mod migrate;
pub mod proxy;
pub mod record;
pub mod registry;
pub mod respond;
pub mod route;
pub mod server;
pub mod ui;
pub mod warm;
