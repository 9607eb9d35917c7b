//! The Kafka producer's settings, and which of its properties are secrets.

use std::collections::BTreeMap;

use serde::Serialize;

/// The Kafka producer. Its `Debug` redacts secret properties, as its `Serialize` does.
#[derive(Clone, Serialize)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma-separated `host:port` (`OUTBOX_KAFKA__BROKERS`).
    pub brokers: String,
    /// librdkafka properties passed through (TLS, SASL, compression, linger).
    /// From the environment, `OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`.
    #[serde(serialize_with = "serialize_redacted_properties")]
    pub properties: BTreeMap<String, String>,
}

impl KafkaSettings {
    /// The largest message the producer may send (`message.max.bytes`, librdkafka's
    /// default 1,000,000): a row whose payload is larger is not even read.
    pub fn message_max_bytes(&self) -> i64 {
        self.properties
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1_000_000)
    }

    /// The properties with every secret value replaced, for logs and `check-config`.
    pub fn redacted_properties(&self) -> BTreeMap<&str, &str> {
        redacted(&self.properties)
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("properties", &self.redacted_properties())
            .finish()
    }
}

/// Whether a librdkafka property holds a secret: every SASL setting but the mechanism
/// and user name (`sasl.password`, `sasl.oauthbearer.config`,
/// `sasl.oauthbearer.client.secret`, `sasl.kerberos.keytab`, ...), key material and
/// passwords of TLS (`ssl.key.pem`, `ssl.key.password`, `ssl.keystore.password`, ...),
/// and anything named like a password, secret, token or credential.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    let public_sasl = [
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.kerberos.service.name",
        "sasl.kerberos.principal",
        "sasl.kerberos.kinit.cmd",
        "sasl.kerberos.min.time.before.relogin",
        "sasl.oauthbearer.method",
        "sasl.oauthbearer.token.endpoint.url",
        "sasl.oauthbearer.scope",
        "sasl.oauthbearer.client.id",
    ];
    (k.starts_with("sasl.") && !public_sasl.contains(&k.as_str()))
        || (k.starts_with("ssl.")
            && (k.contains("password") || k == "ssl.key.pem" || k.contains("keystore")))
        || [
            "password",
            "secret",
            "token",
            "credential",
            "jaas",
            "private",
        ]
        .iter()
        .any(|w| k.contains(w))
}

/// `props` with every secret value replaced by `[redacted]`.
fn redacted(props: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    props
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) {
                "[redacted]"
            } else {
                v.as_str()
            };
            (k.as_str(), v)
        })
        .collect()
}

fn serialize_redacted_properties<S: serde::Serializer>(
    props: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    redacted(props).serialize(s)
}
