//! Where an archive lives: `file:///path` or `s3://bucket/prefix`, opened as an
//! `object_store::ObjectStore` plus the key prefix every object goes under.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

use crate::error::ArchiveError;

/// Longest the client retries one request itself before the archiver's retry takes over.
const STORE_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest a TCP (and TLS) connect to the store may take.
const STORE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest one request may take from start to its last byte: ten minutes carries a default
/// 256 MiB segment at about 0.5 MB/s. A larger `journal_segment_bytes` over a slow link needs
/// a faster link (or smaller segments): the request is cut and retried.
const STORE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Settings for `s3://` URLs that config may give; anything unset comes from the standard
/// AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, ...).
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// An opened archive location.
#[derive(Clone, Debug)]
pub struct ArchiveTarget {
    pub url: String,
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store (may be empty).
    pub prefix: String,
}

impl ArchiveTarget {
    /// Opens `url` (`file:///dir` or `s3://bucket[/prefix]`). A `file://` directory is
    /// created if missing.
    pub fn open(url: &str, s3: &S3Settings) -> Result<ArchiveTarget, ArchiveError> {
        let bad = |why: &str| ArchiveError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| bad("not an absolute local path"))?;
                std::fs::create_dir_all(&dir).map_err(|e| ArchiveError::Io {
                    path: dir.display().to_string(),
                    what: e.to_string(),
                })?;
                let store = LocalFileSystem::new_with_prefix(&dir)?;
                Ok(ArchiveTarget {
                    url: url.to_string(),
                    store: Arc::new(store),
                    prefix: String::new(),
                })
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("no bucket"))?;
                let prefix = parsed.path().trim_matches('/').to_string();
                // Client options first: `with_client_options` replaces them whole, including
                // the `allow_http` that an http:// endpoint sets below.
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_connect_timeout(STORE_CONNECT_TIMEOUT)
                            .with_timeout(STORE_REQUEST_TIMEOUT),
                    );
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                let endpoint = s3
                    .endpoint
                    .clone()
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .or_else(|| std::env::var("AWS_ENDPOINT").ok());
                if let Some(endpoint) = endpoint {
                    // A self-hosted store (Garage, MinIO, Ceph RGW) on plain HTTP, path-style.
                    builder = builder
                        .with_endpoint(&endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                if let Some(key) = &s3.access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                // The archiver retries whole objects with its own backoff (`UploadLimits`), so
                // the client's own retries stay short: a store that is down fails a request
                // in seconds, not after object_store's default three minutes. Each request is
                // bounded too (rule 8: a store that stops answering is not left to TCP).
                builder = builder.with_retry(object_store::RetryConfig {
                    backoff: object_store::BackoffConfig::default(),
                    max_retries: 2,
                    retry_timeout: STORE_RETRY_TIMEOUT,
                });
                let store = builder.build()?;
                Ok(ArchiveTarget {
                    url: url.to_string(),
                    store: Arc::new(store),
                    prefix,
                })
            }
            other => Err(bad(&format!(
                "scheme {other}: only file:// and s3:// are supported"
            ))),
        }
    }

    /// The full key of `rel` (a `/`-separated path under the prefix).
    pub fn key(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }
}
