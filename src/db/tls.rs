//! TLS for connections to PostgreSQL: libpq's `sslmode` and `sslrootcert` settings,
//! applied with rustls.
//!
//! tokio-postgres 0.7 parses `sslmode` only as `disable`, `prefer` or `require`, and
//! rejects `sslrootcert` as an unknown option. [`split_tls_settings`] therefore takes
//! both out of the connection string before the driver parses the rest, and
//! [`TlsSettings::connector`] builds the one connector type that the pool and the
//! dedicated connections share.

use std::path::PathBuf;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector every connection of the service uses, pooled or dedicated.
pub(crate) type TlsConnector = MakeRustlsConnect;

/// TLS requirement of a connection, with libpq's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SslMode {
    /// Plain connections only.
    Disable,
    /// TLS when the server offers it, plain otherwise. This is libpq's default.
    ///
    /// NOTE: a TLS handshake that fails is an error here, while libpq retries
    /// without TLS.
    #[default]
    Prefer,
    /// TLS or no connection. The certificate is checked only when `sslrootcert` names
    /// a file, and then like `verify-ca`.
    Require,
    /// TLS with a certificate chain that leads to a trusted CA, for any host name.
    VerifyCa,
    /// TLS with a trusted chain and a certificate that names the host connected to.
    VerifyFull,
}

/// Source of the trusted CA certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCertificates {
    /// A PEM file named by `sslrootcert`.
    File(PathBuf),
    /// The operating system's trust store, from `sslrootcert=system` or from
    /// `verify-ca` and `verify-full` without `sslrootcert`.
    System,
}

/// The TLS settings of one connection string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TlsSettings {
    pub mode: SslMode,
    /// The value of `sslrootcert`, if one was given.
    pub root_certificates: Option<RootCertificates>,
}

/// Takes `sslmode` and `sslrootcert` out of a postgres URL or key=value connection
/// string, returning the rest of the string for tokio-postgres and the TLS settings.
///
/// A part of the string that does not parse is left in the rest, so that the driver
/// reports it.
///
/// # Errors
///
/// A reason that names the setting but never repeats the input, since the input may
/// contain a password.
pub(crate) fn split_tls_settings(input: &str) -> Result<(String, TlsSettings), String> {
    let (rest, pairs) = match strip_url_prefix(input) {
        Some(prefix_len) => split_url(input, prefix_len)?,
        None => split_key_value(input),
    };

    let mut mode = None;
    let mut root_certificate = None;
    for (key, value) in pairs {
        // A later value replaces an earlier one, as in libpq and tokio-postgres.
        match key {
            TlsKey::SslMode => mode = Some(value),
            TlsKey::SslRootCert => root_certificate = Some(value),
        }
    }
    let settings = TlsSettings::from_values(mode.as_deref(), root_certificate.as_deref())?;
    Ok((rest, settings))
}

impl TlsSettings {
    /// Validates the raw values of `sslmode` and `sslrootcert`.
    fn from_values(mode: Option<&str>, root_certificate: Option<&str>) -> Result<Self, String> {
        let root_certificates = match root_certificate {
            None | Some("") => None,
            Some("system") => Some(RootCertificates::System),
            Some(path) => Some(RootCertificates::File(PathBuf::from(path))),
        };

        let mode = match mode {
            None if root_certificates == Some(RootCertificates::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("prefer") => SslMode::Prefer,
            Some("require") => SslMode::Require,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("verify-full") => SslMode::VerifyFull,
            Some("allow") => {
                return Err(
                    "sslmode=allow is not supported; use prefer, which also accepts \
                            both plain and TLS connections, or disable"
                        .to_owned(),
                )
            }
            Some(_) => {
                return Err(
                    "invalid value for sslmode; expected disable, prefer, require, \
                            verify-ca or verify-full"
                        .to_owned(),
                )
            }
        };

        // libpq 16 rejects the system store with weaker modes, because public CAs sign
        // certificates for any host name and only a host name check makes them safe.
        if root_certificates == Some(RootCertificates::System) && mode != SslMode::VerifyFull {
            return Err(
                "sslrootcert=system requires sslmode=verify-full; set sslmode=verify-full \
                 or remove sslmode"
                    .to_owned(),
            );
        }
        Ok(Self {
            mode,
            root_certificates,
        })
    }

    /// Returns the mode that tokio-postgres applies: whether to request TLS at all and
    /// whether to accept a server that declines. The connector does the certificate
    /// checks.
    pub(crate) fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// Builds the rustls connector that checks the server certificate as the mode
    /// requires, reading the CA certificates now so that a bad `sslrootcert` fails before
    /// the first connection.
    ///
    /// # Errors
    ///
    /// A reason naming the `sslrootcert` file when it cannot be read or contains no
    /// valid certificate, or saying that the system trust store is empty.
    pub(crate) fn connector(&self) -> Result<TlsConnector, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("cannot set up TLS: {error}"))?;

        let config = match (self.mode, &self.root_certificates) {
            // NOTE: rustls matches the host only against the subject alternative names,
            // while libpq also accepts the common name of a certificate without them.
            (SslMode::VerifyFull, roots) => builder
                .with_root_certificates(load_roots(roots.as_ref())?)
                .with_no_client_auth(),
            (SslMode::VerifyCa, roots) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CertificateVerifier {
                    roots: Some(load_roots(roots.as_ref())?),
                    provider,
                }))
                .with_no_client_auth(),
            // libpq checks the chain in these modes too when sslrootcert names a file.
            (SslMode::Prefer | SslMode::Require, Some(roots)) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CertificateVerifier {
                    roots: Some(load_roots(Some(roots))?),
                    provider,
                }))
                .with_no_client_auth(),
            // With sslmode=disable the driver never starts TLS, so this verifier is
            // never called, and the sslrootcert file is not read.
            (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CertificateVerifier {
                    roots: None,
                    provider,
                }))
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

/// Loads the trusted CA certificates: the `sslrootcert` file, or the system store
/// when none is named.
///
/// NOTE: libpq reads `~/.postgresql/root.crt` when `sslrootcert` is absent, but this
/// service uses the system trust store instead.
fn load_roots(source: Option<&RootCertificates>) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    match source {
        Some(RootCertificates::File(path)) => {
            let shown = path.display();
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|error| format!("cannot read sslrootcert file {shown}: {error}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("invalid PEM in sslrootcert file {shown}: {error}"))?;
            if certificates.is_empty() {
                return Err(format!(
                    "sslrootcert file {shown} contains no PEM certificate; \
                     expected the CA certificate that signed the server's certificate"
                ));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|error| {
                    format!("invalid certificate in sslrootcert file {shown}: {error}")
                })?;
            }
        }
        Some(RootCertificates::System) | None => {
            let loaded = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(loaded.certs);
            if roots.is_empty() {
                return Err("the system trust store contains no CA certificate; \
                            set sslrootcert to the CA file of the server"
                    .to_owned());
            }
        }
    }
    Ok(Arc::new(roots))
}

/// A verifier that ignores the host name, as libpq's `verify-ca` and `require` modes
/// do. With `roots` it checks that the certificate chain leads to a trusted CA
/// (`verify-ca`). Without, it accepts any certificate (`require` without a root
/// certificate), so the traffic is encrypted but the server is not authenticated.
/// The handshake signatures are checked either way.
#[derive(Debug)]
struct CertificateVerifier {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CertificateVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };

        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS setting found in a connection string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsKey {
    SslMode,
    SslRootCert,
}

impl TlsKey {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sslmode" => Some(Self::SslMode),
            "sslrootcert" => Some(Self::SslRootCert),
            _ => None,
        }
    }
}

/// Returns the length of the `postgres://` or `postgresql://` prefix, the two that
/// tokio-postgres reads as a URL.
fn strip_url_prefix(input: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .into_iter()
        .find(|prefix| input.starts_with(prefix))
        .map(str::len)
}

/// Splits the TLS parameters out of a URL's query string.
fn split_url(input: &str, prefix_len: usize) -> Result<(String, Vec<(TlsKey, String)>), String> {
    // tokio-postgres ends the user info at the first `@` and the query starts at the
    // first `?` after it, so a `?` in an unencoded password is not a query.
    let after_prefix = &input[prefix_len..];
    let authority_start = prefix_len + after_prefix.find('@').map_or(0, |at| at + 1);
    let Some(query_start) = input[authority_start..]
        .find('?')
        .map(|offset| authority_start + offset)
    else {
        return Ok((input.to_owned(), Vec::new()));
    };

    let mut kept = Vec::new();
    let mut found = Vec::new();
    for parameter in input[query_start + 1..].split('&') {
        let tls_key = parameter
            .split_once('=')
            .and_then(|(name, _)| TlsKey::from_name(&percent_decode_str(name).decode_utf8_lossy()));
        let Some(key) = tls_key else {
            kept.push(parameter);
            continue;
        };
        let (_, raw_value) = parameter
            .split_once('=')
            .expect("the key was found before `=`");
        let value = percent_decode_str(raw_value).decode_utf8().map_err(|_| {
            let name = match key {
                TlsKey::SslMode => "sslmode",
                TlsKey::SslRootCert => "sslrootcert",
            };
            format!("the value of {name} is not valid UTF-8 after percent-decoding")
        })?;
        found.push((key, value.into_owned()));
    }

    let mut rest = input[..query_start].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, found))
}

/// Splits the TLS pairs out of a key=value string, reading keys, quotes and
/// backslash escapes as tokio-postgres does.
fn split_key_value(input: &str) -> (String, Vec<(TlsKey, String)>) {
    let mut scanner = PairScanner { input, position: 0 };
    let mut rest = String::with_capacity(input.len());
    let mut copied_up_to = 0;
    let mut found = Vec::new();

    while let Some(pair) = scanner.next_pair() {
        let Some(key) = TlsKey::from_name(pair.key) else {
            continue;
        };
        rest.push_str(&input[copied_up_to..pair.start]);
        copied_up_to = pair.end;
        found.push((key, pair.value));
    }
    rest.push_str(&input[copied_up_to..]);
    (rest, found)
}

/// One `key=value` pair and the byte range it covers in the input.
struct Pair<'a> {
    key: &'a str,
    value: String,
    start: usize,
    end: usize,
}

/// Reader of `key = value` pairs. It stops at the first malformed pair and leaves it
/// in the rest for tokio-postgres to report.
struct PairScanner<'a> {
    input: &'a str,
    position: usize,
}

impl<'a> PairScanner<'a> {
    fn next_pair(&mut self) -> Option<Pair<'a>> {
        self.skip_whitespace();
        let start = self.position;
        let key = self.take_while(|c| !c.is_whitespace() && c != '=');
        if key.is_empty() {
            return None;
        }
        self.skip_whitespace();
        if !self.eat('=') {
            return None;
        }
        self.skip_whitespace();

        let value = if self.eat('\'') {
            let value = self.unescape_until(|c| c == '\'');
            if !self.eat('\'') {
                return None;
            }
            value
        } else {
            let value = self.unescape_until(char::is_whitespace);
            if value.is_empty() {
                return None;
            }
            value
        };
        Some(Pair {
            key,
            value,
            start,
            end: self.position,
        })
    }

    fn peek(&self) -> Option<char> {
        self.input[self.position..].chars().next()
    }

    fn eat(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.position += expected.len_utf8();
            true
        } else {
            false
        }
    }

    fn skip_whitespace(&mut self) {
        self.take_while(char::is_whitespace);
    }

    fn take_while(&mut self, accept: impl Fn(char) -> bool) -> &'a str {
        let start = self.position;
        while let Some(c) = self.peek().filter(|&c| accept(c)) {
            self.position += c.len_utf8();
        }
        &self.input[start..self.position]
    }

    /// Reads characters up to `end`, dropping each backslash and keeping the character
    /// after it.
    fn unescape_until(&mut self, end: impl Fn(char) -> bool) -> String {
        let mut value = String::new();
        while let Some(c) = self.peek().filter(|&c| !end(c)) {
            self.position += c.len_utf8();
            if c == '\\' {
                if let Some(escaped) = self.peek() {
                    self.position += escaped.len_utf8();
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &str) -> (String, TlsSettings) {
        split_tls_settings(input).unwrap()
    }

    #[test]
    fn url_query_loses_only_tls_parameters() {
        let (rest, settings) = split(
            "postgres://app:pw@db:5432/kpi?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://app:pw@db:5432/kpi?application_name=x&connect_timeout=3"
        );
        assert_eq!(settings.mode, SslMode::VerifyFull);
        assert_eq!(
            settings.root_certificates,
            Some(RootCertificates::File(PathBuf::from("/etc/ca dir/ca.pem")))
        );
    }

    #[test]
    fn url_without_other_parameters_drops_question_mark() {
        let (rest, settings) = split("postgresql://db/kpi?sslmode=verify-ca");
        assert_eq!(rest, "postgresql://db/kpi");
        assert_eq!(settings.mode, SslMode::VerifyCa);
    }

    #[test]
    fn url_question_mark_in_password_is_not_query() {
        let (rest, settings) = split("postgres://app:p?sslmode=disable@db/kpi");
        assert_eq!(rest, "postgres://app:p?sslmode=disable@db/kpi");
        assert_eq!(settings.mode, SslMode::Prefer);
    }

    #[test]
    fn key_value_pairs_lose_only_tls_pairs() {
        let (rest, settings) = split(
            "host=db sslmode = verify-full user=app sslrootcert='/etc/ca dir/it\\'s.pem' dbname=kpi",
        );
        assert_eq!(rest, "host=db  user=app  dbname=kpi");
        assert_eq!(settings.mode, SslMode::VerifyFull);
        assert_eq!(
            settings.root_certificates,
            Some(RootCertificates::File(PathBuf::from(
                "/etc/ca dir/it's.pem"
            )))
        );
    }

    #[test]
    fn key_value_value_containing_sslmode_is_kept() {
        // Guards against matching `sslmode=` inside another pair's quoted value.
        let (rest, settings) = split("password='x sslmode=disable' host=db");
        assert_eq!(rest, "password='x sslmode=disable' host=db");
        assert_eq!(settings.mode, SslMode::Prefer);
    }

    #[test]
    fn malformed_key_value_rest_is_left_for_driver() {
        let (rest, _) = split("host=db sslmode");
        assert_eq!(rest, "host=db sslmode");
    }

    #[test]
    fn later_sslmode_replaces_earlier() {
        let (_, settings) = split("sslmode=disable host=db sslmode=require");
        assert_eq!(settings.mode, SslMode::Require);
    }

    #[test]
    fn absent_sslmode_means_prefer() {
        let (_, settings) = split("host=db");
        assert_eq!(settings, TlsSettings::default());
        assert_eq!(
            settings.driver_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
    }

    #[test]
    fn verify_modes_require_tls_from_driver() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let (_, settings) = split(&format!("host=db sslmode={mode}"));
            assert_eq!(
                settings.driver_mode(),
                tokio_postgres::config::SslMode::Require,
                "{mode}"
            );
        }
    }

    #[test]
    fn system_root_store_defaults_to_verify_full() {
        let (_, settings) = split("host=db sslrootcert=system");
        assert_eq!(settings.mode, SslMode::VerifyFull);
    }

    #[test]
    fn system_root_store_rejects_weaker_mode() {
        let error = split_tls_settings("host=db sslrootcert=system sslmode=require").unwrap_err();
        assert!(error.contains("verify-full"), "{error}");
    }

    #[test]
    fn unknown_sslmode_lists_supported_values() {
        let error = split_tls_settings("host=db sslmode=hunter22").unwrap_err();
        assert!(error.contains("verify-ca"), "{error}");
        assert!(!error.contains("hunter22"), "{error}");
    }

    #[test]
    fn allow_mode_names_alternative() {
        let error = split_tls_settings("host=db sslmode=allow").unwrap_err();
        assert!(error.contains("prefer"), "{error}");
    }

    #[test]
    fn missing_root_certificate_file_is_named() {
        let (_, settings) = split("host=db sslmode=verify-full sslrootcert=/nonexistent/ca.pem");
        let error = settings.connector().err().expect("the file does not exist");
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn root_certificate_file_without_pem_is_rejected() {
        let path = std::env::temp_dir().join(format!("fk-not-pem-{}.txt", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let settings = TlsSettings {
            mode: SslMode::VerifyCa,
            root_certificates: Some(RootCertificates::File(path.clone())),
        };
        let error = settings
            .connector()
            .err()
            .expect("the file holds no certificate");
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains("no PEM certificate"), "{error}");
    }
}
