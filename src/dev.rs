//! `serve --dev`: a first look with zero set-up. A certificate for localhost
//! made in memory, a random signing secret, a room everyone may use, the
//! production defaults for every limit. Loopback only.

use std::net::SocketAddr;
use std::path::Path;

use crate::Prepared;
use crate::auth::jwt::{KeyRing, Minter};
use crate::certs::DevCa;
use crate::config::{ClientAuth, Config, KeyAlgorithm, Secret};

/// The dev server's configuration and the means to mint tokens for it.
pub struct DevSetup {
    pub prepared: Prepared,
    /// Signs tokens with the random dev secret.
    pub minter: Minter,
    /// The dev CA that issued the server certificate, to trust in clients.
    pub ca_pem: String,
    /// The random signing secret, as hex text (for writing to a private file).
    pub secret: Secret,
}

/// Builds the dev setup for `listen`, which must be a loopback address.
pub fn setup(listen: SocketAddr) -> Result<DevSetup, String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "--dev binds loopback addresses only, not {listen}: use --config with real certificates to listen elsewhere"
        ));
    }
    crate::install_crypto_providers();
    let port = listen.port();
    let text = format!(
        r#"
[server]
listen = "{listen}"

[tls]
cert = "in-memory"
key = "in-memory"

[auth]
[[auth.keys]]
kid = "dev"
algorithm = "HS256"
secret_env = "SECURECHAT_DEV_SECRET"

[metrics]
listen = "127.0.0.1:0"

[security]
allowed_origins = ["https://localhost:{port}", "https://127.0.0.1:{port}"]

[[rooms]]
name = "general"
join = ["*"]
post = ["*"]
"#
    );
    let config = Config::parse(&text, Path::new("<--dev>")).map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    // 256 random bits as hex text: the same bytes sign here and, written to a
    // file, let `securechat token --secret-file` mint more tokens.
    let hex: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let secret = Secret::new(hex.into_bytes());
    let keys = KeyRing::with_secret(&config.auth, "dev", KeyAlgorithm::HS256, &secret);
    let minter = Minter::hmac("dev", KeyAlgorithm::HS256, &secret);

    let err = |e: rcgen::Error| format!("certificate generation failed: {e}");
    let ca = DevCa::generate("securechat dev CA (in memory)", 30).map_err(err)?;
    let hosts = ["localhost", "127.0.0.1", "::1"].map(String::from);
    let server = ca.server_cert(&hosts, 30).map_err(err)?;
    let tls = crate::tls::from_pem(&server.cert_pem, &server.key_pem, ClientAuth::Off, None)
        .map_err(|e| e.to_string())?;
    Ok(DevSetup {
        prepared: Prepared {
            config,
            keys,
            tls: Some(tls),
            from_files: false,
        },
        minter,
        ca_pem: ca.pem().cert_pem.clone(),
        secret,
    })
}
