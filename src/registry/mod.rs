//! The registry wire protocol with no I/O: the grammar of names, digests and references, request paths,
//! the OCI error envelope, and the header and media-type names regmux speaks.
//!
//! Everything here is pure and table-tested without sockets. Nothing in this module may open a
//! connection, read a clock or log: it only parses and formats.

pub mod challenge;
pub mod error;
pub mod manifest;
pub mod path;
pub mod types;

pub use error::{ErrorCode, OciError};
pub use path::{parse_path, PathError, RegistryPath};
pub use types::{Digest, Reference, RepoName};

/// `Docker-Distribution-API-Version`, sent on every answer (distribution-spec "Determining support").
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
pub const API_VERSION: &str = "registry/2.0";
/// The digest of the content a manifest or blob response carries.
pub const CONTENT_DIGEST_HEADER: &str = "docker-content-digest";
