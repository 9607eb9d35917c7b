//! Reading the relay's `/metrics`: Prometheus text format, parsed once, values looked up
//! by metric name and labels.

use prometheus_parse::{Scrape, Value};

/// One scrape of `/metrics`.
pub struct Metrics(Scrape);

impl Metrics {
    /// Parses Prometheus text format, failing the test if it is not.
    pub fn parse(text: &str) -> Metrics {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .map(Metrics)
            .unwrap_or_else(|e| panic!("not Prometheus text format: {e}\n{text}"))
    }

    /// The value of the first sample of `name` with (at least) `labels`; a histogram's is
    /// its count.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match x.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                Value::Histogram(ref h) => h.last().map(|b| b.count).unwrap_or(0.0),
                Value::Summary(_) => f64::NAN,
            })
    }

    /// The value of `name{source="<source>"}`; panics if the series is missing (the relay
    /// creates every per-source series at start).
    pub fn of_source(&self, name: &str, source: &str) -> f64 {
        self.value(name, &[("source", source)])
            .unwrap_or_else(|| panic!("no series {name}{{source=\"{source}\"}}"))
    }
}
