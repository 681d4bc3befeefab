//! TLS to backends: the platform's roots (plus a backend's `ca_file`), loaded on the first TLS
//! handshake instead of when a backend is built.
//!
//! reqwest builds a platform verifier per client, and on Linux that reads every file of
//! `/etc/ssl/certs` (441 here) before regmux can bind its port: for each backend, at every start and
//! every reload. The backends without a `ca_file` share one verifier, built at first use.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub struct LazyVerifier {
    extra_roots: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    inner: OnceLock<Result<Arc<rustls_platform_verifier::Verifier>, rustls::Error>>,
}

impl fmt::Debug for LazyVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyVerifier").field("extra_roots", &self.extra_roots.len()).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

impl LazyVerifier {
    pub fn new(extra_roots: Vec<CertificateDer<'static>>) -> LazyVerifier {
        LazyVerifier { extra_roots, provider: provider(), inner: OnceLock::new() }
    }

    /// The verifier of the backends without a `ca_file`.
    pub fn shared() -> Arc<LazyVerifier> {
        static SHARED: OnceLock<Arc<LazyVerifier>> = OnceLock::new();
        SHARED.get_or_init(|| Arc::new(LazyVerifier::new(Vec::new()))).clone()
    }

    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        let built = self.inner.get_or_init(|| {
            rustls_platform_verifier::Verifier::new_with_extra_roots(self.extra_roots.clone(), self.provider.clone())
                .map(Arc::new)
        });
        built.as_deref().map_err(Clone::clone)
    }
}

impl ServerCertVerifier for LazyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `insecure_skip_verify = true`: any certificate is accepted (signatures are still checked, so the
/// handshake itself is sound; only the identity is not).
#[derive(Debug)]
pub struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client TLS configuration without ALPN (the caller adds it) that accepts any certificate.
pub fn insecure_client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
        .with_no_client_auth())
}

/// A verifier trusting the system's roots plus the PEM certificates of `ca_file` (at least one).
pub fn verifier_with_ca_file(ca_file: &std::path::Path) -> Result<Arc<LazyVerifier>, String> {
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(Arc::new(LazyVerifier::new(certs)))
}

/// A client TLS configuration (HTTP/2 and HTTP/1.1 by ALPN) verifying with `verifier`.
pub fn client_config(verifier: Arc<LazyVerifier>) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
