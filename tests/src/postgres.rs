//! Debian's PostgreSQL in a lab namespace: a fresh cluster (initdb) owned by
//! the `postgres` user, listening on the namespace's address with password
//! (SCRAM) authentication, for the relay fleet's shared store.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::netns::Netns;
use crate::proc::Proc;

/// Database user, database and password of every lab cluster.
pub const USER: &str = "weft";
/// Its password (a lab secret, shown redacted by the relay).
pub const PASSWORD: &str = "lab-s3cret";
/// The port.
pub const PORT: u16 = 5432;

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/N/bin`).
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let b = e.path().join("bin");
                    b.join("postgres").is_file().then_some((v, b))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql: apt-get install postgresql")
    })
}

/// A running cluster.
pub struct LabPostgres {
    pub ns: Netns,
    pub ip: String,
    pub data: PathBuf,
    pub proc: Proc,
}

impl LabPostgres {
    /// initdb (user [`USER`], password [`PASSWORD`], database `weft`) and start it on `ip`.
    pub fn start(ns: Netns, ip: &str) -> LabPostgres {
        // The namespace's scratch dir is root's 0700: let `postgres` through to its own dir.
        std::fs::set_permissions(ns.dir(), std::fs::Permissions::from_mode(0o711))
            .unwrap_or_else(|e| panic!("{}: {e}", ns.dir().display()));
        let data = ns.file("pgdata");
        let pw = ns.file("pgpass");
        std::fs::write(&pw, PASSWORD).unwrap_or_else(|e| panic!("{e}"));
        let d = data.display();
        ns.exec(&format!(
            "mkdir -p {d} && chown postgres:postgres {d} {pw} && chmod 700 {d} && \
             setpriv --reuid=postgres --regid=postgres --init-groups -- {bin}/initdb -D {d} -U {USER} \
               --auth=scram-sha-256 --pwfile={pw} -E UTF8 --locale=C.UTF-8 >/dev/null && \
             echo 'host all all 0.0.0.0/0 scram-sha-256' >> {d}/pg_hba.conf",
            pw = pw.display(),
            bin = bin_dir().display()
        ));
        let proc = LabPostgres::spawn(&ns, ip, &data);
        ns.exec(&format!(
            "PGPASSWORD={PASSWORD} psql -q -h {ip} -U {USER} -d postgres -c 'CREATE DATABASE weft'"
        ));
        LabPostgres {
            ns,
            ip: ip.to_string(),
            data,
            proc,
        }
    }

    fn spawn(ns: &Netns, ip: &str, data: &std::path::Path) -> Proc {
        ns.spawn_listening(
            "postgres",
            &format!(
                "setpriv --reuid=postgres --regid=postgres --init-groups -- {}/postgres -D {} \
                 -k {} -h {ip} -p {PORT} -c fsync=off -c log_min_messages=warning",
                bin_dir().display(),
                data.display(),
                data.display()
            ),
            't',
            PORT,
            Duration::from_secs(20),
        )
    }

    /// The URL relays use (with the password).
    pub fn url(&self) -> String {
        format!("postgres://{USER}:{PASSWORD}@{}:{PORT}/weft", self.ip)
    }

    /// Runs SQL with psql; returns its output (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        self.ns.exec(&format!(
            "PGPASSWORD={PASSWORD} psql -qAt -h {} -U {USER} -d weft -c \"{sql}\"",
            self.ip
        ))
    }

    /// Stops the server (fast shutdown: clients are disconnected) and starts it again.
    pub fn restart(&mut self, down_for: Duration) {
        self.proc.interrupt();
        std::thread::sleep(down_for);
        self.proc = LabPostgres::spawn(&self.ns, &self.ip, &self.data);
    }
}
