//! A throwaway PostgreSQL for the demo: `initdb` into a temp dir, `pg_ctl start` on a free
//! port on 127.0.0.1, and at exit `pg_ctl stop` and the directory removed.
//!
//! PostgreSQL refuses to run as root; when the demo runs as root the server tools run as
//! the `postgres` user (`runuser -u postgres --`). A watchdog shell, blocked on a pipe
//! only this process holds, stops the server and removes the directory if the demo dies
//! without running its destructors (SIGKILL, a third Ctrl-C).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// A running throwaway cluster; stopped and removed on drop.
pub struct Postgres {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// Run the server tools as the `postgres` user (we are root).
    as_postgres: bool,
    version: String,
    watchdog: Option<Child>,
    /// Removed after the server stopped (fields drop in order, after `Drop::drop`).
    _dir: TempDir,
}

impl Postgres {
    /// Creates and starts the cluster; blocking, a second or two.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-demo-")
            .tempdir()
            .context("create a temp dir")?;
        // A directory we just created is owned by our effective user.
        let as_postgres = fs::metadata(dir.path())?.uid() == 0;
        if as_postgres {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .context("hand the temp dir to the postgres user")?;
        }
        let data = dir.path().join("data");
        let version = String::from_utf8_lossy(
            &Command::new(bin.join("pg_ctl"))
                .arg("--version")
                .output()
                .context("run pg_ctl --version")?
                .stdout,
        )
        .split_whitespace()
        .skip_while(|w| *w != "(PostgreSQL)")
        .nth(1)
        .unwrap_or("?")
        .to_string();
        let mut pg = Postgres {
            port: 0,
            bin,
            data,
            as_postgres,
            version,
            watchdog: None,
            _dir: dir,
        };
        pg.init()?;
        pg.watchdog = Some(pg.arm_watchdog()?);
        let mut attempt = 0;
        loop {
            pg.port = free_port()?;
            match pg.try_start() {
                Ok(()) => return Ok(pg),
                Err(e) if attempt < 5 && e.contains("already in use") => attempt += 1,
                Err(e) => bail!("{e}"),
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's version, e.g. `15.8`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `CREATE DATABASE db`.
    pub async fn create_database(&self, db: &str) -> Result<()> {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .context("connect to PostgreSQL")?;
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .with_context(|| format!("create database {db}"))?;
        drop(client);
        let _ = conn.await;
        Ok(())
    }

    /// A server tool, run as the `postgres` user when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        if let Some(dir) = self.data.parent() {
            cmd.current_dir(dir);
        }
        // Own process group: a Ctrl-C at the terminal is the demo's to handle, it must
        // not reach the server (the demo still needs it to drain).
        cmd.stdin(Stdio::null()).process_group(0);
        cmd
    }

    fn init(&self) -> Result<()> {
        let out = self
            .tool("initdb")
            .arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .context("run initdb (is `runuser` installed?)")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Local only, no Unix socket (its default directory may not be writable), and
        // durability traded for speed: this cluster lives for a few minutes.
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .context("open postgresql.conf")?;
        conf.write_all(
            b"\n# outbox-relay demo\n\
              listen_addresses = '127.0.0.1'\n\
              unix_socket_directories = ''\n\
              max_connections = 100\n\
              shared_buffers = 64MB\n\
              fsync = off\n\
              synchronous_commit = off\n\
              full_page_writes = off\n",
        )?;
        Ok(())
    }

    fn try_start(&self) -> Result<(), String> {
        let log = self.data.with_file_name("server.log");
        let out = self
            .tool("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "-o"])
            .arg(format!("-p {}", self.port))
            .output()
            .map_err(|e| format!("run pg_ctl: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    fn stop(&self, mode: &str) -> bool {
        self.tool("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A shell that stops the server and removes the directory once its stdin closes,
    /// which happens when this process exits however it exits.
    fn arm_watchdog(&self) -> Result<Child> {
        let dir = self.data.parent().unwrap_or(Path::new("/nonexistent"));
        let runas = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "trap '' INT HUP TERM; read _; {runas}{pg_ctl} stop -D {data} -m immediate -w -t 10 \
             >/dev/null 2>&1; rm -rf {dir}",
            pg_ctl = quote(&self.bin.join("pg_ctl")),
            data = quote(&self.data),
            dir = quote(dir),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("start the cleanup watchdog")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.stop("fast") {
            self.stop("immediate");
        }
        if let Some(mut w) = self.watchdog.take() {
            // Disarm: the server is stopped and TempDir removes the directory.
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The directory of `initdb`, `pg_ctl` and `postgres`: `$PG_BIN_DIR`, else where
/// `initdb` on PATH really lives, else the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("PG_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                let real = fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(parent) = real.parent() {
                    return Ok(parent.to_path_buf());
                }
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context(
        "PostgreSQL server binaries not found: put initdb, pg_ctl and postgres on PATH \
         (Debian/Ubuntu: apt-get install postgresql), or set PG_BIN_DIR",
    )
}

/// uid and gid of the `postgres` user.
fn postgres_user() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .context(
            "running as root, and PostgreSQL refuses to: create a `postgres` user \
             (installing the postgresql package does) or run the demo as an ordinary user",
        )
}

/// A port on 127.0.0.1 that is free right now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}
