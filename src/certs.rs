//! Development certificates (rcgen, ECDSA P-256): a CA, a server certificate
//! for the given hosts, and a client certificate for mTLS trials. Used by
//! `securechat gen-cert`, `serve --dev` and the tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"MASKED")
            .finish()
    }
}

/// A development CA that signs server and client certificates.
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    pem: PemPair,
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

/// How long `gen-cert`'s server and client certificates live, the back-dated
/// day included: browsers and the Mozilla TLS profiles refuse leaves that
/// live longer than 366 days (398 for public CAs until 2026).
pub const LEAF_DAYS: i64 = 365;

/// How long `gen-cert`'s CA lives, the back-dated day included.
pub const CA_DAYS: i64 = 825;

/// From a day ago (clocks differ) to `valid_days` days after that.
fn validity(params: &mut CertificateParams, valid_days: i64) {
    let from = time::OffsetDateTime::now_utc() - days(1);
    params.not_before = from;
    params.not_after = from + days(valid_days);
}

impl DevCa {
    /// A new CA valid for `valid_days` days in all, from a day ago.
    pub fn generate(name: &str, valid_days: i64) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "securechat development");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, valid_days);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self { params, key, pem })
    }

    /// The CA certificate and key.
    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    fn sign(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        valid_days: i64,
    ) -> Result<PemPair, rcgen::Error> {
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, valid_days);
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `hosts` (DNS names or IP addresses).
    pub fn server_cert(&self, hosts: &[String], valid_days: i64) -> Result<PemPair, rcgen::Error> {
        let cn = hosts.first().map(String::as_str).unwrap_or("localhost");
        self.sign(
            hosts.to_vec(),
            cn,
            ExtendedKeyUsagePurpose::ServerAuth,
            valid_days,
        )
    }

    /// A client certificate whose subject common name is `name`.
    pub fn client_cert(&self, name: &str, valid_days: i64) -> Result<PemPair, rcgen::Error> {
        self.sign(
            Vec::new(),
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            valid_days,
        )
    }
}

/// The files `gen-cert` writes.
pub struct Written {
    pub files: Vec<PathBuf>,
}

/// Writes a CA, a server certificate for `hosts` and a client certificate into
/// `dir`; private keys get mode 0600. Existing files are not overwritten
/// unless `force`.
pub fn write_dev_pki(dir: &Path, hosts: &[String], force: bool) -> Result<Written, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let err = |e: rcgen::Error| format!("certificate generation failed: {e}");
    let ca = DevCa::generate("securechat development CA", CA_DAYS).map_err(err)?;
    let server = ca.server_cert(hosts, LEAF_DAYS).map_err(err)?;
    let client = ca
        .client_cert("securechat-dev-client", LEAF_DAYS)
        .map_err(err)?;
    let files: [(&str, &str, bool); 6] = [
        ("ca.crt", &ca.pem().cert_pem, false),
        ("ca.key", &ca.pem().key_pem, true),
        ("server.crt", &server.cert_pem, false),
        ("server.key", &server.key_pem, true),
        ("client.crt", &client.cert_pem, false),
        ("client.key", &client.key_pem, true),
    ];
    if !force && let Some((name, ..)) = files.iter().find(|(name, ..)| dir.join(name).exists()) {
        return Err(format!(
            "{} exists; pass --force to replace the files in {}",
            dir.join(name).display(),
            dir.display()
        ));
    }
    let mut written = Vec::new();
    for (name, content, private) in files {
        let path = dir.join(name);
        write_file(&path, content.as_bytes(), private)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(Written { files: written })
}

/// Writes a file; private ones are created with mode 0600 before any byte lands.
pub fn write_file(path: &Path, content: &[u8], private: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(if private { 0o600 } else { 0o644 });
        let mut file = options.open(path)?;
        // An existing file keeps its old mode through open(); set it explicitly.
        file.set_permissions(std::fs::Permissions::from_mode(if private {
            0o600
        } else {
            0o644
        }))?;
        file.write_all(content)?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        let mut file = options.open(path)?;
        file.write_all(content)
    }
}
