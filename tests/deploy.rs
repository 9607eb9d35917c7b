//! The Kubernetes manifests against the relay's own configuration loader: a ConfigMap
//! key the relay does not know, or a source it cannot load, fails the build.

use std::collections::HashMap;

use outbox_relay::config::Settings;
use serde::Deserialize;
use serde_yaml_ng::Value;

fn configmaps() -> HashMap<String, HashMap<String, String>> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/k8s/platform/platform-configmap.yaml"
    ))
    .expect("read the ConfigMap manifest");
    let mut out = HashMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).expect("valid YAML");
        if v["kind"] != "ConfigMap" {
            continue;
        }
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        let data = v["data"]
            .as_mapping()
            .expect("data")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().expect("string key").to_string(),
                    v.as_str()
                        .expect("string value (quote numbers)")
                        .to_string(),
                )
            })
            .collect();
        out.insert(name, data);
    }
    out
}

#[test]
fn the_configmap_loads_through_the_relays_configuration() {
    let maps = configmaps();
    let env_map = &maps["outbox-relay-config"];
    let relay_toml = &maps["outbox-relay-sources"]["relay.toml"];
    let mut env: HashMap<String, String> = env_map.clone();
    // What the Secret provides (placeholders).
    for var in [
        "CUSTOMER_DATABASE_URL",
        "PRODUCT_DATABASE_URL",
        "PRODUCT_ADMIN_DATABASE_URL",
        "PRODUCT_LOADER_DATABASE_URL",
    ] {
        env.insert(
            var.into(),
            "postgres://outbox_relay:x@postgres:5432/platform?sslmode=verify-full".into(),
        );
    }
    let s = Settings::from_parts(Some(relay_toml), &env).unwrap_or_else(|e| panic!("{e}"));
    // The plan's values arrive as the relay's settings.
    assert_eq!(s.batch_size, 10);
    assert_eq!(s.delete_batch_size, 50);
    assert_eq!(s.process_interval, std::time::Duration::from_secs(5));
    assert_eq!(s.max_retries, 3);
    assert_eq!(s.dead_letter_size, 1000);
    assert_eq!(s.operation_timeout, std::time::Duration::from_secs(30));
    assert!(s.enabled);
    assert_eq!(s.http.listen.port(), 8080);
    assert_eq!(s.sources.len(), 4);
    for k in env_map.keys() {
        assert!(
            k.to_ascii_uppercase().starts_with("OUTBOX_"),
            "{k}: not a relay setting"
        );
    }

    // And a key the relay does not know is refused, naming it.
    let mut typo = env.clone();
    typo.insert("outbox_bach_size".into(), "10".into());
    let err = Settings::from_parts(Some(relay_toml), &typo).unwrap_err();
    assert!(err.to_string().contains("bach_size: unknown key"), "{err}");
}
