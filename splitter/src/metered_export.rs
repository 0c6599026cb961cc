//! A layer over any NBD export that counts the host's requests and bytes and times writes and
//! flushes, for `GET /metrics`; atomics only, so it adds no lock to the host's path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use cdp_metrics::LatencyHistogram;
use cdp_nbd::export::{Export, ExportError, ExportFeatures, Extent, MetaContext};

/// One volume's host I/O since the splitter started.
#[derive(Debug, Default)]
pub struct HostIo {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub flushes: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// From the request reaching the export to its answer: production, split link and the
    /// appliance's acknowledgement (and, with FUA, both syncs).
    pub write_latency: LatencyHistogram,
    pub flush_latency: LatencyHistogram,
}

impl HostIo {
    fn count<T>(&self, result: &Result<T, ExportError>) {
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `inner` with its requests counted into `io`.
pub struct MeteredExport<E> {
    inner: E,
    io: Arc<HostIo>,
}

impl<E: Export> MeteredExport<E> {
    pub fn new(inner: E, io: Arc<HostIo>) -> MeteredExport<E> {
        MeteredExport { inner, io }
    }
}

#[async_trait]
impl<E: Export> Export for MeteredExport<E> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn features(&self) -> ExportFeatures {
        self.inner.features()
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        let result = self.inner.read(offset, length).await;
        self.io.reads.fetch_add(1, Ordering::Relaxed);
        if let Ok(data) = &result {
            self.io
                .read_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        self.io.count(&result);
        result
    }

    async fn allocation(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Option<Vec<Extent>>, ExportError> {
        self.inner.allocation(offset, length).await
    }

    fn meta_context(&self, query: &str) -> Option<Arc<dyn MetaContext>> {
        self.inner.meta_context(query)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let started = Instant::now();
        let len = data.len() as u64;
        let result = self.inner.write(offset, data, fua).await;
        self.io.write_latency.observe(started.elapsed());
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            self.io.write_bytes.fetch_add(len, Ordering::Relaxed);
        }
        self.io.count(&result);
        result
    }

    async fn flush(&self) -> Result<(), ExportError> {
        let started = Instant::now();
        let result = self.inner.flush().await;
        self.io.flush_latency.observe(started.elapsed());
        self.io.flushes.fetch_add(1, Ordering::Relaxed);
        self.io.count(&result);
        result
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        let result = self.inner.trim(offset, length, fua).await;
        self.io.trims.fetch_add(1, Ordering::Relaxed);
        self.io.count(&result);
        result
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        let result = self.inner.write_zeroes(offset, length, fua, may_trim).await;
        self.io.zeroes.fetch_add(1, Ordering::Relaxed);
        self.io.count(&result);
        result
    }

    async fn write_zeroes_fast(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        let result = self
            .inner
            .write_zeroes_fast(offset, length, fua, may_trim)
            .await;
        // A fast zero refused as not fast is an answer, not a failure: only count zeroes done.
        if result.is_ok() {
            self.io.zeroes.fetch_add(1, Ordering::Relaxed);
        }
        if !matches!(result, Err(ExportError::NotSupported(_))) {
            self.io.count(&result);
        }
        result
    }

    async fn cache(&self, offset: u64, length: u32) -> Result<(), ExportError> {
        self.inner.cache(offset, length).await
    }
}
