//! TLS to PostgreSQL: libpq's sslmodes against a real server with a certificate
//! from a throwaway CA.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::PgServer;
use outbox_relay::db::DatabaseUrl;

const TIMEOUT: Duration = Duration::from_secs(10);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for localhost and 127.0.0.1, in `dir`.
fn make_certs(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// Whether the session behind `client` is encrypted, as the server sees it.
async fn session_encrypted(client: &tokio_postgres::Client) -> Result<bool, String> {
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// Whether the relay's own connection to `url` is encrypted.
async fn encrypted(url: &str) -> Result<bool, String> {
    let (client, _notices) = DatabaseUrl::parse(url)?
        .connect(TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    session_encrypted(&client).await
}

/// Whether a pooled connection to `url` is encrypted.
async fn pool_encrypted(url: &str) -> Result<bool, String> {
    let pool = DatabaseUrl::parse(url)?.pool(2, TIMEOUT)?;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    session_encrypted(&client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_require_and_verify_full_work_and_a_wrong_ca_is_refused() {
    let pg = PgServer::start();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), "relay-test-ca");
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path(), "someone-else");
    let data = pg.data_dir().to_path_buf();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(certs.path().join(f), data.join(f)).unwrap();
        common::chown_to_pg(&data.join(f));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    pg.psql("postgres", "ALTER SYSTEM SET ssl = on");
    pg.restart();

    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    assert_eq!(
        encrypted(&format!("{base}?sslmode=disable")).await,
        Ok(false)
    );
    assert_eq!(
        encrypted(&format!("{base}?sslmode=require")).await,
        Ok(true)
    );
    // prefer, the default: encrypted when the server offers TLS, on the lock
    // connection and in the pool alike (the connector is built at the first handshake).
    assert_eq!(encrypted(&base).await, Ok(true));
    assert_eq!(
        pool_encrypted(&format!("{base}?sslmode=prefer")).await,
        Ok(true)
    );
    assert_eq!(
        pool_encrypted(&format!("{base}?sslmode=disable")).await,
        Ok(false)
    );
    let ca = certs.path().join("relay-test-ca.pem");
    let full = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.display()
    );
    assert_eq!(
        encrypted(&full).await,
        Ok(true),
        "verify-full against the right CA"
    );
    let wrong_ca = other.path().join("someone-else.pem");
    let err = encrypted(&format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        wrong_ca.display()
    ))
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate"),
        "a clear refusal: {err}"
    );
    // require with a root certificate verifies the chain, as libpq does.
    let err = encrypted(&format!(
        "{base}?sslmode=require&sslrootcert={}",
        wrong_ca.display()
    ))
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
