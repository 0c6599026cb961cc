//! What a TLS failure means for a replication link, in the terms an administrator acts on
//! (shared by the TLS setup and the link's byte stream).

/// Says what a TLS failure means for the link, in the terms an administrator acts on.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(
            alert @ (A::UnknownCA
            | A::BadCertificate
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied
            // What a verifier answers a certificate whose signature fails: another CA
            // of the same name signed it.
            | A::DecryptError),
        ) => format!(
            "the peer refused this appliance's TLS certificate ({alert:?} alert): check that \
             its CA is the peer's tls ca"
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("the peer ended the TLS session ({alert:?} alert)")
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "the peer's TLS certificate is not signed by a CA this appliance trusts (its tls \
             ca): UnknownIssuer"
                .to_string()
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature) => {
            "the peer's TLS certificate is not signed by a CA this appliance trusts (its tls \
             ca; another CA of the same name signed it): BadSignature"
                .to_string()
        }
        rustls::Error::InvalidCertificate(why) => {
            format!("the peer's TLS certificate is not accepted: {why}")
        }
        rustls::Error::NoCertificatesPresented => {
            "the peer presented no TLS certificate (mutual TLS requires one)".to_string()
        }
        other => format!("TLS: {other}"),
    }
}
