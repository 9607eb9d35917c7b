//! A connection string taken apart the way libpq reads it, so that what the relay
//! connects with and what it shows come from one parse: the password is a value the
//! parser found, never a stretch of text guessed at.
//!
//! Both spellings libpq accepts are understood: `postgres[ql]://user:password@hosts/db?k=v`
//! and `key=value` pairs (values quoted with `'`, `\` escapes, spaces around `=`).

use std::fmt::Write as _;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// The parameters of a connection string, in order, as `key=value` pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnInfo {
    /// Whether it was written as a URL (it is shown back as one).
    uri: Option<Uri>,
    /// Every parameter, the URL's user, password, hosts and database included.
    pub params: Vec<(String, String)>,
}

/// What a URL spelling needs to be shown back as a URL.
#[derive(Debug, Clone, PartialEq)]
struct Uri {
    scheme: &'static str,
    /// The host list as written (`h1:5432,[::1]:5433`), with no credentials.
    hosts: String,
    /// Where the query's parameters start in `params`.
    query_from: usize,
}

/// Keys whose value is a secret.
const SECRET_KEYS: &[&str] = &["password", "sslpassword", "sslkey_password"];

/// Characters encoded in a URL's user and password when the relay re-writes them.
const USERINFO: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'@')
    .add(b':')
    .add(b'/')
    .add(b'?')
    .add(b'#')
    .add(b'&')
    .add(b'=')
    .add(b'[')
    .add(b']')
    .add(b'\'')
    .add(b'"')
    .add(b'\\');

impl ConnInfo {
    /// Takes `s` apart. Errors never quote the string: it may hold a password.
    pub fn parse(s: &str) -> Result<ConnInfo, String> {
        for scheme in ["postgresql://", "postgres://"] {
            if let Some(rest) = s.strip_prefix(scheme) {
                return parse_uri(scheme, rest);
            }
        }
        parse_pairs(s)
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Removes every value of `key`, returning the last.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut last = None;
        self.params.retain(|(k, v)| {
            if k == key {
                last = Some(v.clone());
                false
            } else {
                true
            }
        });
        last
    }

    /// Sets `key`, replacing what it had.
    pub fn set(&mut self, key: &str, value: &str) {
        self.take(key);
        self.params.push((key.to_string(), value.to_string()));
    }

    /// Every parameter as one `key='value'` string, quoted and escaped: what tokio-postgres
    /// is given to parse, so it reads exactly these values.
    pub fn to_pairs(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.params {
            if !out.is_empty() {
                out.push(' ');
            }
            let _ = write!(
                out,
                "{k}='{}'",
                v.replace('\\', "\\\\").replace('\'', "\\'")
            );
        }
        out
    }

    /// The connection string as the user wrote it (URL or pairs), with every secret
    /// value replaced by `[redacted]`. Built from the parsed values alone.
    pub fn redacted(&self) -> String {
        let shown = |k: &str, v: &str| {
            if SECRET_KEYS.contains(&k) {
                "[redacted]".to_string()
            } else {
                v.to_string()
            }
        };
        match &self.uri {
            Some(uri) => {
                let (authority, query) =
                    self.params.split_at(uri.query_from.min(self.params.len()));
                let find = |key: &str| authority.iter().find(|(k, _)| k == key).map(|(_, v)| v);
                let mut out = uri.scheme.to_string();
                let user = find("user");
                let has_password = find("password").is_some();
                if let Some(u) = user {
                    out.push_str(&utf8_percent_encode(u, USERINFO).to_string());
                }
                if has_password {
                    out.push_str(":[redacted]");
                }
                if user.is_some() || has_password {
                    out.push('@');
                }
                out.push_str(&uri.hosts);
                if let Some(db) = find("dbname") {
                    out.push('/');
                    out.push_str(&utf8_percent_encode(db, USERINFO).to_string());
                }
                let query: Vec<String> = query
                    .iter()
                    .map(|(k, v)| format!("{k}={}", shown(k, v)))
                    .collect();
                if !query.is_empty() {
                    out.push('?');
                    out.push_str(&query.join("&"));
                }
                out
            }
            None => self
                .params
                .iter()
                .map(|(k, v)| {
                    let v = shown(k, v);
                    if v.is_empty() || v.contains([' ', '\'', '\\']) {
                        format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// `key = value` pairs, as libpq and tokio-postgres read them.
fn parse_pairs(s: &str) -> Result<ConnInfo, String> {
    let mut params = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if it.peek().is_some() {
                return Err("a connection parameter has no name before `=`".into());
            }
            break;
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            // The word may be a piece of an unquoted password with a space in it: it is
            // not quoted back.
            return Err(
                "a connection parameter has no `=` (quote a value with spaces: key='a b')".into(),
            );
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(format!(
                            "connection parameter `{key}`: unterminated quoted value"
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("connection parameter `{key}` has no value"));
            }
        }
        params.push((key, value));
    }
    Ok(ConnInfo { uri: None, params })
}

/// Whether `s` can be a URL's host list: names, IPv4 and bracketed IPv6 addresses,
/// ports, commas, percent-encoded Unix socket directories.
fn host_list(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-_:,[]%".contains(c))
}

/// `user:password@hosts/db?params` after the scheme.
///
/// The credentials end at the first `@` that is followed by a valid host list, as
/// libpq and tokio-postgres read it when that works; a password holding a raw `@`
/// makes the text after that `@` no host list (it holds the next `@`), and the next
/// `@` is tried, where libpq would take the rest of the password for a host name and
/// print it in its connect error. A raw `/` or `?` in a password works too. An `@` in
/// a query value (`?password=p@ss`) stays in the query. Percent-encoding is still the
/// unambiguous spelling.
fn parse_uri(scheme: &'static str, rest: &str) -> Result<ConnInfo, String> {
    let decode = |what: &str, s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| format!("the URL's {what} is not valid UTF-8 once percent-decoded"))
    };
    let mut params = Vec::new();
    let at = rest.match_indices('@').map(|(i, _)| i).find(|&i| {
        let after = &rest[i + 1..];
        let end = after.find(['/', '?']).unwrap_or(after.len());
        host_list(&after[..end])
    });
    let after_creds = match at {
        Some(i) => {
            let creds = &rest[..i];
            let (user, password) = match creds.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (creds, None),
            };
            if !user.is_empty() {
                params.push(("user".to_string(), decode("user", user)?));
            }
            if let Some(p) = password {
                params.push(("password".to_string(), decode("password", p)?));
            }
            &rest[i + 1..]
        }
        None => rest,
    };
    let end = after_creds.find(['/', '?']).unwrap_or(after_creds.len());
    let hosts = &after_creds[..end];
    if !host_list(hosts) {
        return Err(
            "the URL's host list is not valid (a password with `@` in it must be \
                    percent-encoded as %40)"
                .into(),
        );
    }
    let mut names = Vec::new();
    let mut ports = Vec::new();
    for chunk in hosts.split(',').filter(|c| !c.is_empty()) {
        let (host, port) = if let Some(inner) = chunk.strip_prefix('[') {
            let (h, tail) = inner
                .split_once(']')
                .ok_or("the URL's IPv6 host has no closing `]`")?;
            (h, tail.strip_prefix(':'))
        } else {
            match chunk.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (chunk, None),
            }
        };
        names.push(decode("host", host)?);
        ports.push(port.unwrap_or("").to_string());
    }
    if !names.is_empty() {
        params.push(("host".to_string(), names.join(",")));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        let ports: Vec<&str> = ports
            .iter()
            .map(|p| if p.is_empty() { "5432" } else { p.as_str() })
            .collect();
        params.push(("port".to_string(), ports.join(",")));
    }
    let mut tail = &after_creds[end..];
    if let Some(path) = tail.strip_prefix('/') {
        let end = path.find('?').unwrap_or(path.len());
        if end > 0 {
            params.push(("dbname".to_string(), decode("database name", &path[..end])?));
        }
        tail = &path[end..];
    }
    let query_from = params.len();
    if let Some(query) = tail.strip_prefix('?') {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or("a URL parameter has no `=`")?;
            let k = decode("parameter name", k)?;
            let v = decode("parameter value", v)?;
            params.push((k, v));
        }
    }
    Ok(ConnInfo {
        uri: Some(Uri {
            scheme,
            hosts: hosts.to_string(),
            query_from,
        }),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::ConnInfo;

    /// Each spelling of a password libpq accepts, with the password it holds.
    const SPELLINGS: &[(&str, &str)] = &[
        ("postgresql://role_a:ab/cd?x-Zq@host/db", "ab/cd?x-Zq"),
        ("postgresql://role_a:pa?ss-Zq@host/db", "pa?ss-Zq"),
        ("postgresql://role_a:p@ss-Zq@host:5433/db", "p@ss-Zq"),
        ("postgresql://role_a:p%40ss-Zq@host/db", "p@ss-Zq"),
        (
            "postgres://role_a:p%2Fss-Zq@host/db?sslmode=disable",
            "p/ss-Zq",
        ),
        (
            "postgres://role_a@host/db?password=Zq-x&sslmode=disable",
            "Zq-x",
        ),
        (
            "host=h user=role_a password='Zq two-Zqpart'",
            "Zq two-Zqpart",
        ),
        ("host=h user=role_a password = Zq-three", "Zq-three"),
        ("host=h password=Zq\\ four\\'s dbname=db", "Zq four's"),
        (
            "postgres://relay@host/db?sslmode=disable&password=p@ss-Zq",
            "p@ss-Zq",
        ),
        ("postgres://u:p@ss@Zq@host/db", "p@ss@Zq"),
        ("host=h password='it\\'s-Zq' dbname=db", "it's-Zq"),
    ];

    #[test]
    fn every_spelling_yields_its_password_and_shows_none_of_it() {
        for (spelling, password) in SPELLINGS {
            let info = ConnInfo::parse(spelling).unwrap();
            assert_eq!(info.get("password"), Some(*password), "{spelling}");
            let shown = info.redacted();
            assert!(!shown.contains("Zq"), "{spelling} shown as {shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
            // tokio-postgres reads the same password from what it is given.
            let config: tokio_postgres::Config = info.to_pairs().parse().unwrap();
            assert_eq!(
                config.get_password(),
                Some(password.as_bytes()),
                "{spelling}"
            );
        }
    }

    #[test]
    fn urls_keep_their_hosts_ports_database_and_parameters() {
        let info = ConnInfo::parse("postgres://u:pw@h1:5433,[::1],h3/app%2Fdb?sslmode=require&x=1")
            .unwrap();
        assert_eq!(info.get("host"), Some("h1,::1,h3"));
        assert_eq!(info.get("port"), Some("5433,5432,5432"));
        assert_eq!(info.get("dbname"), Some("app/db"));
        assert_eq!(info.get("sslmode"), Some("require"));
        assert_eq!(
            info.redacted(),
            "postgres://u:[redacted]@h1:5433,[::1],h3/app%2Fdb?sslmode=require&x=1"
        );
        let info = ConnInfo::parse("postgresql://h/db").unwrap();
        assert_eq!(info.redacted(), "postgresql://h/db");
        let info = ConnInfo::parse("postgres:///db?host=/run/pg&port=5433").unwrap();
        assert_eq!(info.redacted(), "postgres:///db?host=/run/pg&port=5433");
        assert_eq!(info.get("host"), Some("/run/pg"));
        assert_eq!(info.get("user"), None);
    }

    #[test]
    fn malformed_strings_are_errors_that_quote_nothing() {
        for bad in [
            "host=h password='Zq-unterminated",
            "host=h password",
            "host=h password=Zq two-Zqpart",
            "postgres://u:Zq@ho st/db",
            "postgres://u:Zq@[::1/db",
        ] {
            let err = ConnInfo::parse(bad).unwrap_err();
            assert!(!err.contains("Zq"), "{bad}: {err}");
        }
    }
}
