//! rustls server configuration with the aws-lc-rs provider: TLS 1.2 and 1.3
//! only, ALPN `h2` and `http/1.1`, optional or required client certificates.
//! PEM files are read with rustls-pki-types' `PemObject`.
//!
//! The serving certificate lives in a [`CertStore`] that the configuration
//! resolves through, so a reload swaps it for new handshakes while open
//! connections keep the one they negotiated.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClientAuth, TlsConfig};

/// A TLS setting that cannot be used; the message names the key and the fix.
#[derive(Debug, thiserror::Error)]
#[error("tls.{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        key,
        message: message.into(),
    }
}

/// The one crypto provider of the process: aws-lc-rs, with AES-128-GCM
/// first among the cipher suites. The server picks by its own order
/// (`ignore_client_order`): AES-128-GCM with SHA-256 is what browsers offer
/// first and costs less per handshake than AES-256-GCM with SHA-384, which
/// rustls-based clients list first.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // A stable sort: AES-128-GCM suites move ahead, the rest keep their order.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// Installs aws-lc-rs as rustls' process default (idempotent), for code that
/// builds configs without naming a provider.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What `check` and the logs say about the serving certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    pub fn days_left(&self) -> i64 {
        (self.not_after - crate::auth::jwt::now_unix()).div_euclid(86_400)
    }
}

/// The server configuration in service, swapped whole when the client CA
/// is read again (the serving certificate swaps inside it, [`CertStore`]).
pub type ServingConfig = arc_swap::ArcSwap<ServerConfig>;

/// A loaded TLS configuration and facts about its leaf certificate.
pub struct TlsSetup {
    pub config: Arc<ServerConfig>,
    pub leaf: CertInfo,
    /// The swappable serving certificate.
    pub store: Arc<CertStore>,
}

/// The serving certificate and key, swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    current: arc_swap::ArcSwap<CertifiedKey>,
}

impl CertStore {
    fn new(key: CertifiedKey) -> Self {
        Self {
            current: arc_swap::ArcSwap::from_pointee(key),
        }
    }

    /// Reads `tls.cert` and `tls.key` again and serves them from the next
    /// handshake on. On any error the current certificate stays.
    pub fn reload(&self, tls: &TlsConfig) -> Result<CertInfo, TlsError> {
        let (key, info) = load_certified(tls)?;
        self.current.store(Arc::new(key));
        Ok(info)
    }

    /// The certificate served now.
    pub fn current_info(&self) -> Option<CertInfo> {
        cert_info(self.current.load().cert.first()?).ok()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads the files named in `[tls]` and builds the server configuration.
pub fn load(tls: &TlsConfig) -> Result<TlsSetup, TlsError> {
    let (key, leaf) = load_certified(tls)?;
    build(key, leaf, tls.client_auth, read_client_roots(tls)?)
}

/// The client CA certificates `tls.client_ca` names, when client
/// certificates are asked for.
fn read_client_roots(tls: &TlsConfig) -> Result<Option<Vec<CertificateDer<'static>>>, TlsError> {
    match (&tls.client_auth, &tls.client_ca) {
        (ClientAuth::Off, _) => Ok(None),
        (_, Some(path)) => Ok(Some(read_chain(path, "client_ca")?)),
        (_, None) => Err(err("client_ca", "missing while client_auth is on")),
    }
}

/// Reads `tls.client_ca` again and builds a configuration that verifies
/// client certificates against it, serving the certificate of `store`.
/// How many CA certificates it holds comes with it. The configuration
/// starts with an empty session cache: a resumed session is not checked
/// against the CA again, so no session made under the previous CA resumes.
pub fn reload_client_ca(
    tls: &TlsConfig,
    store: &Arc<CertStore>,
) -> Result<(Arc<ServerConfig>, usize), TlsError> {
    let roots = read_client_roots(tls)?;
    let count = roots.as_ref().map_or(0, Vec::len);
    let config = server_config(store.clone(), tls.client_auth, roots)?;
    Ok((Arc::new(config), count))
}

/// Reads the certificate chain and key and checks that they belong together
/// and that the certificate has not expired.
fn load_certified(tls: &TlsConfig) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let cert_path = tls.cert.as_deref().ok_or_else(|| err("cert", "missing"))?;
    let key_path = tls.key.as_deref().ok_or_else(|| err("key", "missing"))?;
    let chain = read_chain(cert_path, "cert")?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        err(
            "key",
            format!(
                "{}: no usable PEM private key ({e}); point tls.key at the key of tls.cert",
                key_path.display()
            ),
        )
    })?;
    certified(chain, key)
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let leaf = cert_info(chain.first().ok_or_else(|| err("cert", "empty chain"))?)
        .map_err(|m| err("cert", m))?;
    if leaf.not_after < crate::auth::jwt::now_unix() {
        return Err(err(
            "cert",
            format!("the certificate {} has expired; renew it", leaf.subject),
        ));
    }
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        err(
            "key",
            format!("the key does not fit the certificate chain in tls.cert: {e}"),
        )
    })?;
    Ok((key, leaf))
}

/// Builds a configuration from PEM text (for `--dev` and tests).
pub fn from_pem(
    chain_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth,
    client_ca_pem: Option<&str>,
) -> Result<TlsSetup, TlsError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("cert", e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| err("key", e.to_string()))?;
    let roots = client_ca_pem
        .map(|pem| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err("client_ca", e.to_string()))
        })
        .transpose()?;
    let (key, leaf) = certified(chain, key)?;
    build(key, leaf, client_auth, roots)
}

fn read_chain(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(key, format!("{}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(err(
            key,
            format!("{}: no PEM CERTIFICATE block found", path.display()),
        ));
    }
    Ok(chain)
}

fn build(
    key: CertifiedKey,
    leaf: CertInfo,
    client_auth: ClientAuth,
    client_roots: Option<Vec<CertificateDer<'static>>>,
) -> Result<TlsSetup, TlsError> {
    let store = Arc::new(CertStore::new(key));
    let config = server_config(store.clone(), client_auth, client_roots)?;
    Ok(TlsSetup {
        config: Arc::new(config),
        leaf,
        store,
    })
}

fn server_config(
    store: Arc<CertStore>,
    client_auth: ClientAuth,
    client_roots: Option<Vec<CertificateDer<'static>>>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("cert", e.to_string()))?;
    let builder = match (client_auth, client_roots) {
        (ClientAuth::Off, _) => builder.with_no_client_auth(),
        (mode, Some(roots)) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in roots {
                store
                    .add(cert)
                    .map_err(|e| err("client_ca", format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider);
            let verifier = if mode == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| err("client_ca", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        (_, None) => return Err(err("client_ca", "missing while client_auth is on")),
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    // rustls protects every record for the whole connection: no secret is
    // extracted and the key log stays rustls's default, which logs nothing.
    Ok(config)
}

/// Subject, serial and expiry of a DER certificate.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The subject of a verified client certificate, if the client sent one.
pub fn client_subject(conn: &rustls::CommonState) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    cert_info(cert).ok().map(|info| info.subject)
}
