//! The WireGuard cross-platform userspace API (UAPI) on
//! `/var/run/wireguard/NAME.sock`, so `wg show`, `wg showconf` and `wg set`
//! work on our interface as on wireguard-go. The codec is pure
//! ([`codec`]); this module is the socket shell.

pub(crate) mod codec;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::device::Device;
use crate::netlink::Link;
use crate::udp::UdpIo;

/// Largest request accepted on the UAPI socket.
const MAX_REQUEST: usize = 4 << 20;

/// The bound UAPI socket; removes its file when dropped.
pub(crate) struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

/// The UAPI socket path of an interface.
pub(crate) fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

impl Listener {
    /// Binds `DIR/NAME.sock` (mode 0600: `get` reveals the private key).
    /// Fails if another process answers on it; removes a stale file.
    pub(crate) fn bind(dir: &Path, interface: &str) -> anyhow::Result<Listener> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = socket_path(dir, interface);
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                anyhow::bail!(
                    "interface {interface} is already in use: {} answers (another `mesh up` or wireguard-go?)",
                    path.display()
                );
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        Ok(Listener { listener, path })
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves UAPI clients until cancelled.
pub(crate) async fn serve(
    listener: Listener,
    device: Arc<Device>,
    link: Link,
    udp: Arc<UdpIo>,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener
            .listener
            .accept()
            .await
            .context("accepting on the UAPI socket")?;
        let device = device.clone();
        let link = link.clone();
        let udp = udp.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &device, &link, &udp).await {
                tracing::debug!(error = %e, "UAPI client error");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    device: &Device,
    link: &Link,
    udp: &UdpIo,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut request = String::new();
    while let Some(line) = lines.next_line().await? {
        if !line.is_empty() {
            if request.len() + line.len() > MAX_REQUEST {
                write
                    .write_all(codec::format_errno(libc::ENOMEM).as_bytes())
                    .await?;
                return Ok(());
            }
            request.push_str(&line);
            request.push('\n');
            continue;
        }
        if request.is_empty() {
            continue;
        }
        let response = respond(&request, device, link, udp).await;
        write.write_all(response.as_bytes()).await?;
        request.clear();
    }
    Ok(())
}

async fn respond(request: &str, device: &Device, link: &Link, udp: &UdpIo) -> String {
    match codec::parse_request(request) {
        Ok(codec::Request::Get) => codec::format_get_response(&device.info(SystemTime::now())),
        Ok(codec::Request::Set(set)) => {
            // As wireguard-go: a new port (0: a random one) rebinds the
            // socket at once; a port in use fails the whole set.
            if let Some(port) = set
                .listen_port
                .filter(|p| *p == 0 || *p != device.listen_port())
            {
                match udp.rebind(port, device.fwmark.load(Ordering::Relaxed)) {
                    Ok(bound) => {
                        tracing::info!(
                            from = device.listen_port(),
                            to = bound,
                            "listen port changed"
                        );
                        device.set_listen_port(bound);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI set rejected");
                        let errno = match &e {
                            crate::udp::BindError::Bind { source, .. } => {
                                source.raw_os_error().unwrap_or(libc::EADDRINUSE)
                            }
                            _ => libc::EINVAL,
                        };
                        return codec::format_errno(errno);
                    }
                }
            }
            let mark = set.fwmark;
            match device.apply(set) {
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI set rejected");
                    codec::format_errno(libc::EINVAL)
                }
                Ok(diff) => {
                    if let Some(mark) = mark {
                        if let Err(e) = udp.set_mark(mark) {
                            tracing::warn!(mark, error = %e, "setting the socket's fwmark failed");
                            return codec::format_errno(libc::EPERM);
                        }
                    }
                    // Errors are logged; the device's state is already changed.
                    let _ = crate::netlink::apply_route_diff(link, device, udp, &diff).await;
                    codec::format_errno(0)
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "bad UAPI request");
            codec::format_errno(e.errno())
        }
    }
}
