//! One scrape's metric families, filled from a snapshot and encoded in Prometheus's text format
//! (version 0.0.4) by `prometheus-client`.
//!
//! Families are kept in the order they were first named and each gets its samples under one
//! `# HELP`/`# TYPE` header, so a process can add samples group by group or volume by volume.
//! Names follow Prometheus's conventions: base units in the name (`_bytes`, `_seconds`), and a
//! counter is named without `_total`, which the encoder appends.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::histogram::HistogramSnapshot;

/// A sample's labels, in the order they are printed.
pub type Labels = Vec<(String, String)>;

/// The `Content-Type` of what `Exposition::encode` returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
enum Value {
    Gauge(f64),
    Counter(u64),
    Histogram(HistogramSnapshot),
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
    /// `_info` families carry their labels and the constant 1.
    info: Option<Labels>,
}

/// The families of one scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    fn family(&mut self, name: &'static str, help: &'static str, kind: MetricType) -> &mut Family {
        let at = match self.families.iter().position(|f| f.name == name) {
            Some(at) => at,
            None => {
                self.families.push(Family {
                    name,
                    help,
                    kind,
                    samples: Vec::new(),
                    info: None,
                });
                self.families.len() - 1
            }
        };
        let family = &mut self.families[at];
        debug_assert!(family.kind == kind, "{name} used as two metric types");
        family
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: &Labels, value: f64) {
        self.family(name, help, MetricType::Gauge)
            .samples
            .push((labels.clone(), Value::Gauge(value)));
    }

    /// A boolean state as a 0/1 gauge.
    pub fn flag(&mut self, name: &'static str, help: &'static str, labels: &Labels, on: bool) {
        self.gauge(name, help, labels, if on { 1.0 } else { 0.0 });
    }

    /// A count that only grows while the process runs; `name` without `_total`.
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: &Labels, value: u64) {
        debug_assert!(
            !name.ends_with("_total"),
            "{name}: the encoder appends _total"
        );
        self.family(name, help, MetricType::Counter)
            .samples
            .push((labels.clone(), Value::Counter(value)));
    }

    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &Labels,
        value: HistogramSnapshot,
    ) {
        self.family(name, help, MetricType::Histogram)
            .samples
            .push((labels.clone(), Value::Histogram(value)));
    }

    /// An `_info` family (`name` without `_info`): constant 1 with descriptive labels.
    pub fn info(&mut self, name: &'static str, help: &'static str, labels: Labels) {
        self.family(name, help, MetricType::Info).info = Some(labels);
    }

    /// The text exposition.
    pub fn encode(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Families(self.families)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let mut metric =
                encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            if let Some(labels) = &family.info {
                metric.encode_info(labels)?;
            }
            for (labels, value) in &family.samples {
                let mut sample = metric.encode_family(labels)?;
                match value {
                    Value::Gauge(v) => sample.encode_gauge(v)?,
                    Value::Counter(v) => sample.encode_counter::<NoLabelSet, u64, u64>(v, None)?,
                    Value::Histogram(h) => {
                        sample.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::LatencyHistogram;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The encoded text names counters with `_total`, info with `_info`, keeps one header per
    /// family and escapes label values.
    #[test]
    fn families_encode_in_the_text_format() {
        let mut e = Exposition::new();
        e.info("cdp_build", "Build.", labels(&[("version", "0.1.0")]));
        let a = labels(&[("group", "g\"1")]);
        let b = labels(&[("group", "g2")]);
        e.counter("cdp_writes", "Writes.", &a, 7);
        e.gauge("cdp_journal_bytes", "Bytes.", &a, 4096.0);
        e.counter("cdp_writes", "Writes.", &b, 9);
        let h = LatencyHistogram::default();
        h.observe(std::time::Duration::from_millis(2));
        e.histogram("cdp_write_duration_seconds", "Latency.", &a, h.snapshot());
        let text = e.encode().unwrap();
        assert!(
            text.contains("# TYPE cdp_build_info gauge\ncdp_build_info{version=\"0.1.0\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE cdp_writes_total counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("cdp_writes_total{group=\"g\\\"1\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("cdp_writes_total{group=\"g2\"} 9\n"),
            "{text}"
        );
        assert!(
            text.contains("cdp_journal_bytes{group=\"g\\\"1\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains("cdp_write_duration_seconds_bucket{group=\"g\\\"1\",le=\"0.0025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("cdp_write_duration_seconds_bucket{group=\"g\\\"1\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("cdp_write_duration_seconds_count{group=\"g\\\"1\"} 1\n"),
            "{text}"
        );
    }
}
