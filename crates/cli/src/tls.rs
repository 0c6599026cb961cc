//! `cdp tls ca` and `cdp tls issue`: the certificates of the replication link's mutual TLS, made without openssl.
//!
//! `ca` makes a certificate authority (`ca.pem`, `ca-key.pem`); `issue` signs a certificate
//! for one appliance (`cert.pem`, `key.pem`, and a copy of `ca.pem`, so the directory holds
//! the three files `replication_tls` / `[group.remote] tls` name). Issued certificates serve
//! both ends of a link (server and client authentication). Keys are ECDSA P-256, written
//! mode 0600; no file is overwritten without `--force`. Use a CA for replication only: every
//! certificate it signs may connect.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make a certificate authority for replication links: DIR/ca.pem and DIR/ca-key.pem.
    Ca(CaArgs),
    /// Sign a certificate for one appliance with the CA: DIR/cert.pem, DIR/key.pem and a
    /// copy of the CA's ca.pem.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct CaArgs {
    /// Directory to write ca.pem and ca-key.pem into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The CA's common name. Default `cdp replication CA XXXXXXXX`, the suffix from its key:
    /// certificates are matched to CAs by name, so two CAs should never share one.
    #[arg(long)]
    name: Option<String>,
    /// Days the CA certificate is valid.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// Directory holding the CA's ca.pem and ca-key.pem (from `cdp tls ca`).
    #[arg(long)]
    ca: PathBuf,
    /// The appliance's name (certificate common name; also a DNS or IP name in the
    /// certificate when it is one).
    #[arg(long)]
    name: String,
    /// A DNS name the appliance is reached by (repeatable); a source's `server_name`, or its
    /// endpoint's host, must be one of these or an `--ip`.
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// An IP address the appliance is reached by (repeatable).
    #[arg(long = "ip")]
    ip: Vec<IpAddr>,
    /// Directory to write cert.pem, key.pem and ca.pem into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 825)]
    days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

pub fn run(command: TlsCommand) -> anyhow::Result<()> {
    match command {
        TlsCommand::Ca(args) => make_ca(&args),
        TlsCommand::Issue(args) => issue(&args),
    }
}

/// Valid from an hour ago (clocks of two sites differ a little) for `days`.
fn validity(params: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// Refuses to replace any of `paths` unless `force`, before anything is written.
fn check_free(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    for path in paths {
        if path.exists() {
            bail!(
                "{} already exists; not overwriting it (pass --force to replace it)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Writes `text` to `path` with `mode` (also when replacing a file, whose old mode
/// `open` would keep).
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn make_ca(args: &CaArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let cert_path = args.out.join("ca.pem");
    let key_path = args.out.join("ca-key.pem");
    check_free(&[&cert_path, &key_path], args.force)?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => {
            // Bytes of the public key's x coordinate (after the 0x04 point tag): random.
            let tag: String = key
                .public_key_raw()
                .iter()
                .skip(1)
                .take(4)
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("cdp replication CA {tag}")
        }
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, &name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, args.days)?;
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    // The key first: a certificate without its key is useless, the reverse is not.
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    crate::output::report(
        &serde_json::json!({ "ca": name, "certificate": cert_path, "key": key_path }),
        || {
            format!(
                "CA {name:?} written: {} (certificate, give it to every appliance) and {} (key, \
                 keep it private; only `cdp tls issue` needs it)",
                cert_path.display(),
                key_path.display()
            )
        },
    )
}

/// The certificate's names: each `--dns` and `--ip`, plus `--name` when it is a DNS name
/// or an IP address, without duplicates.
fn subject_alt_names(args: &IssueArgs) -> anyhow::Result<Vec<SanType>> {
    let mut names = Vec::new();
    let mut add = |san: SanType| {
        if !names.contains(&san) {
            names.push(san);
        }
    };
    match args.name.parse::<IpAddr>() {
        Ok(ip) => add(SanType::IpAddress(ip)),
        Err(_) => {
            if let Ok(dns) = args.name.clone().try_into() {
                if rustls_like_dns_name(&args.name) {
                    add(SanType::DnsName(dns));
                }
            }
        }
    }
    for dns in &args.dns {
        if !rustls_like_dns_name(dns) {
            bail!("--dns {dns:?} is not a DNS name");
        }
        let ia5 = dns
            .clone()
            .try_into()
            .with_context(|| format!("--dns {dns:?}"))?;
        add(SanType::DnsName(ia5));
    }
    for ip in &args.ip {
        add(SanType::IpAddress(*ip));
    }
    // A certificate no peer can verify is worse than none: it fails only at the first connect.
    if names.is_empty() {
        bail!(crate::output::CliError::new(
            crate::output::ErrorKind::Usage,
            format!(
                "--name {:?} is neither a DNS name nor an IP address, so the certificate would \
                 have no name a peer can check; give a DNS name or IP as --name, or add --dns \
                 NAME / --ip ADDRESS",
                args.name
            )
        ));
    }
    Ok(names)
}

/// Letters, digits, hyphens and dots, labels of 1..=63 characters: what a TLS client accepts
/// as a server name.
fn rustls_like_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn issue(args: &IssueArgs) -> anyhow::Result<()> {
    let ca_cert_path = args.ca.join("ca.pem");
    let ca_key_path = args.ca.join("ca-key.pem");
    let ca_cert_pem = std::fs::read_to_string(&ca_cert_path).with_context(|| {
        format!(
            "reading the CA certificate {} (made by `cdp tls ca --out {}`)",
            ca_cert_path.display(),
            args.ca.display()
        )
    })?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("reading the CA key {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a PEM private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .with_context(|| format!("{}: not a PEM CA certificate", ca_cert_path.display()))?;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let cert_path = args.out.join("cert.pem");
    let key_path = args.out.join("key.pem");
    let ca_copy_path = args.out.join("ca.pem");
    let copy_ca = !same_file(&ca_copy_path, &ca_cert_path);
    let mut outputs = vec![cert_path.as_path(), key_path.as_path()];
    if copy_ca {
        outputs.push(&ca_copy_path);
    }
    check_free(&outputs, args.force)?;

    let key = KeyPair::generate().context("generating the key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, &args.name);
    params.subject_alt_names = subject_alt_names(args)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate per appliance serves both ends of its links.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, args.days)?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    // Proves the CA's key and certificate belong together (a mismatch would only show later
    // as a refused link): the new certificate must pass the check a receiver makes.
    if let Err(why) =
        cdp_appliance::replication::tls::check_issued(ca_cert_pem.as_bytes(), cert.pem().as_bytes())
    {
        bail!(
            "the new certificate does not verify against {} ({why}): is {} the key of that CA?",
            ca_cert_path.display(),
            ca_key_path.display()
        );
    }
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    if copy_ca {
        write_file(&ca_copy_path, &ca_cert_pem, 0o644)?;
    }
    let names: Vec<String> = params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::DnsName(d) => d.as_str().to_string(),
            SanType::IpAddress(ip) => ip.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    crate::output::report(
        &serde_json::json!({
            "name": args.name,
            "names": names,
            "certificate": cert_path,
            "key": key_path,
            "ca": copy_ca.then_some(&ca_copy_path),
        }),
        || {
            format!(
                "certificate for {:?} (names: {}) written to {}: cert.pem, key.pem (private), \
                 ca.pem",
                args.name,
                names.join(", "),
                args.out.display()
            )
        },
    )
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
