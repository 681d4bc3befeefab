//! Manifest digests. For every manifest type the digest is the SHA-256 of the bytes, except Docker
//! schema1 signed manifests (`application/vnd.docker.distribution.manifest.v1+prettyjws`): their
//! digest is that of the payload without the JWS signatures, which distribution recovers from the
//! `formatLength` and `formatTail` of the signature's protected header (docker/libtrust `jsonsign.go`).
//! distribution 2.8 still serves schema1 to a client that sends no `Accept`.

use base64::Engine as _;

use super::types::Digest;

pub const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The bytes whose hash is the digest of this manifest.
pub fn digested_bytes<'a>(content_type: &str, bytes: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
    if content_type.eq_ignore_ascii_case(SCHEMA1_SIGNED) {
        if let Some(payload) = schema1_payload(bytes) {
            return std::borrow::Cow::Owned(payload);
        }
    }
    std::borrow::Cow::Borrowed(bytes)
}

/// Whether a manifest of this type hashes to `digest`.
pub fn matches(digest: &Digest, content_type: &str, bytes: &[u8]) -> bool {
    digest.matches(&digested_bytes(content_type, bytes))
}

/// The digest of a manifest of this type.
pub fn digest_of(content_type: &str, bytes: &[u8]) -> Digest {
    Digest::sha256_of(&digested_bytes(content_type, bytes))
}

#[derive(serde::Deserialize)]
struct Signed {
    signatures: Vec<Signature>,
}

#[derive(serde::Deserialize)]
struct Signature {
    protected: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Protected {
    format_length: usize,
    format_tail: String,
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// `bytes[..formatLength] + base64url(formatTail)`, from the first signature.
fn schema1_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    let signed: Signed = serde_json::from_slice(bytes).ok()?;
    let protected: Protected = serde_json::from_slice(&b64url(&signed.signatures.first()?.protected)?).ok()?;
    let mut payload = bytes.get(..protected.format_length)?.to_vec();
    payload.extend_from_slice(&b64url(&protected.format_tail)?);
    Some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema1_digest_is_of_the_payload() {
        let payload = b"{\n   \"schemaVersion\": 1,\n   \"name\": \"x\"\n}";
        // A signed manifest: the payload's closing "\n}" is replaced by the signatures block.
        let cut = payload.len() - 2;
        let tail = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&payload[cut..]);
        let protected = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"formatLength":{cut},"formatTail":"{tail}"}}"#));
        let signed = format!(
            "{},\n   \"signatures\": [{{\"protected\": \"{protected}\", \"signature\": \"x\"}}]\n}}",
            std::str::from_utf8(&payload[..cut]).unwrap()
        );
        let want = Digest::sha256_of(payload);
        assert!(matches(&want, SCHEMA1_SIGNED, signed.as_bytes()));
        assert_eq!(digest_of(SCHEMA1_SIGNED, signed.as_bytes()), want);
        assert!(!matches(&want, "application/vnd.oci.image.manifest.v1+json", signed.as_bytes()));
        // Anything else is the hash of its bytes.
        assert_eq!(digest_of("application/json", b"{}"), Digest::sha256_of(b"{}"));
    }
}
