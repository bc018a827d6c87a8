//! How a [`RelayClient`](crate::RelayClient) reaches its relay: plain UDP (the default), DTLS 1.2
//! with the allocation key as PSK (cargo feature `dtls`, OpenSSL), or one WebSocket binary
//! message per Relay message over TCP or TLS. Each carries Relay messages unchanged.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use ferry_proto::ws;

/// Which of an allocation's endpoints to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `udp`.
    Udp,
    /// `dtls`: DTLS 1.2 over UDP, PSK = the allocation key, identity = the allocation ID.
    #[cfg(feature = "dtls")]
    Dtls,
    /// `ws`: WebSocket over plain TCP.
    Ws,
    /// `wss`: WebSocket over TLS, trusting the web's roots or, with `ca_file`, that CA alone.
    Wss { ca_file: Option<PathBuf> },
}

impl Transport {
    /// The endpoint's `connectionType`.
    pub fn connection_type(&self) -> &'static str {
        match self {
            Self::Udp => "udp",
            #[cfg(feature = "dtls")]
            Self::Dtls => "dtls",
            Self::Ws => "ws",
            Self::Wss { .. } => "wss",
        }
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A WebSocket connection to the relay.
pub(crate) struct WsLink {
    io: Box<dyn Stream>,
    tcp: TcpStream,
    decoder: ws::Decoder,
    inbuf: Vec<u8>,
    out: Vec<u8>,
}

impl WsLink {
    pub fn open(addr: SocketAddr, tls_name: Option<(&str, Option<&std::path::Path>)>) -> io::Result<Self> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut io: Box<dyn Stream> = match tls_name {
            Some((name, ca)) => {
                let cfg = crate::http::tls_config(ca)?;
                let sni = rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let conn = rustls::ClientConnection::new(cfg, sni).map_err(io::Error::other)?;
                Box::new(rustls::StreamOwned::new(conn, tcp.try_clone()?))
            }
            None => Box::new(tcp.try_clone()?),
        };
        let mut key = [0u8; 16];
        getrandom(&mut key)?;
        // Host is the relay's IP:port, as Unity Transport sends it.
        io.write_all(ws::upgrade_request(&addr.to_string(), "/", &key).as_bytes())?;
        io.flush()?;
        let mut inbuf = Vec::new();
        let mut chunk = [0u8; 1024];
        let used = loop {
            match ws::check_upgrade_response(&inbuf, &key) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let n = io.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            inbuf.extend_from_slice(&chunk[..n]);
        };
        inbuf.drain(..used);
        Ok(Self { io, tcp, decoder: ws::Decoder::client(), inbuf, out: Vec::new() })
    }

    pub fn send(&mut self, m: &[u8]) -> io::Result<()> {
        let mut mask = [0u8; 4];
        getrandom(&mut mask)?;
        self.out.clear();
        ws::encode_masked(&mut self.out, 0x2, m, mask);
        self.io.write_all(&self.out)?;
        self.io.flush()
    }

    /// The next binary message into `buf`, waiting up to `timeout` (`None`: only what has
    /// arrived). Pings are answered on the way.
    pub fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
        loop {
            let mut pong = None;
            match self.decoder.decode(&self.inbuf) {
                Ok(Some((used, frame))) => {
                    let got = match frame {
                        Some(ws::Frame::Binary(m)) => {
                            let n = m.len().min(buf.len());
                            buf[..n].copy_from_slice(&m[..n]);
                            Some(n)
                        }
                        Some(ws::Frame::Ping(p)) => {
                            pong = Some(p.to_vec());
                            None
                        }
                        Some(ws::Frame::Close(_)) => return Err(io::ErrorKind::ConnectionAborted.into()),
                        Some(ws::Frame::Pong) | None => None,
                    };
                    self.inbuf.drain(..used);
                    if let Some(p) = pong {
                        let mut mask = [0u8; 4];
                        getrandom(&mut mask)?;
                        self.out.clear();
                        ws::encode_masked(&mut self.out, 0xA, &p, mask);
                        self.io.write_all(&self.out)?;
                        self.io.flush()?;
                    }
                    if got.is_some() {
                        return Ok(got);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(v) => return Err(io::Error::new(io::ErrorKind::InvalidData, v.as_str())),
            }
            match timeout {
                Some(t) => {
                    self.tcp.set_nonblocking(false)?;
                    self.tcp.set_read_timeout(Some(t.max(Duration::from_millis(1))))?;
                }
                None => self.tcp.set_nonblocking(true)?,
            }
            let mut chunk = [0u8; 4096];
            match self.io.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn getrandom(b: &mut [u8]) -> io::Result<()> {
    ::getrandom::getrandom(b).map_err(io::Error::other)
}

#[cfg(feature = "dtls")]
pub(crate) use dtls::DtlsLink;

#[cfg(feature = "dtls")]
mod dtls {
    use super::*;
    use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream};
    use std::net::UdpSocket;

    /// One datagram per read or write on a connected UDP socket.
    struct Dgram(UdpSocket);

    impl Read for Dgram {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.recv(b)
        }
    }

    impl Write for Dgram {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.send(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A DTLS session with the relay, as Unity Transport opens one: DTLS 1.2, AEAD PSK suites,
    /// MTU 1400, handshake retransmitted from 1 s.
    pub(crate) struct DtlsLink {
        stream: SslStream<Dgram>,
    }

    const DTLS_CTRL_HANDLE_TIMEOUT: std::ffi::c_int = 74;

    impl DtlsLink {
        pub fn open(sock: &UdpSocket, relay: SocketAddr, id: &[u8; 16], key: &[u8; 64]) -> io::Result<Self> {
            let s = sock.try_clone()?;
            s.connect(relay)?;
            let mut b = SslContext::builder(SslMethod::dtls_client()).map_err(io::Error::other)?;
            b.set_cipher_list("PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305")
                .map_err(io::Error::other)?;
            b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
            // OpenSSL reads a client identity up to its first zero byte: an ID with one is sent
            // in its text form, which the relay accepts too.
            let identity: Vec<u8> = if id.contains(&0) {
                crate::wire::AllocationId(*id).to_string().into_bytes()
            } else {
                id.to_vec()
            };
            let key = *key;
            b.set_psk_client_callback(move |_, _, id_out, psk_out| {
                if id_out.len() <= identity.len() || psk_out.len() < 64 {
                    return Ok(0);
                }
                id_out[..identity.len()].copy_from_slice(&identity);
                id_out[identity.len()] = 0;
                psk_out[..64].copy_from_slice(&key);
                Ok(64)
            });
            let mut ssl = Ssl::new(&b.build()).map_err(io::Error::other)?;
            ssl.set_connect_state();
            ssl.set_mtu(1400).map_err(io::Error::other)?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let mut stream = SslStream::new(ssl, Dgram(s)).map_err(io::Error::other)?;
            let clock = crate::clock::Clock::new();
            let until = clock.now() + 15_000;
            loop {
                match stream.do_handshake() {
                    Ok(()) => return Ok(Self { stream }),
                    Err(e) if e.code() == ErrorCode::WANT_READ && clock.now() < until => {
                        // SAFETY: a live SSL; the control takes no argument.
                        unsafe {
                            openssl_sys::SSL_ctrl(
                                foreign_types::ForeignTypeRef::as_ptr(stream.ssl()),
                                DTLS_CTRL_HANDLE_TIMEOUT,
                                0,
                                std::ptr::null_mut(),
                            );
                        }
                    }
                    Err(e) => return Err(io::Error::other(format!("DTLS handshake: {e}"))),
                }
            }
        }

        pub fn send(&mut self, m: &[u8]) -> io::Result<()> {
            self.stream.ssl_write(m).map(|_| ()).map_err(io::Error::other)
        }

        /// The next record into `buf`, waiting up to `timeout` (`None`: non-blocking).
        pub fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
            let sock = &self.stream.get_ref().0;
            match timeout {
                Some(t) => {
                    sock.set_nonblocking(false)?;
                    sock.set_read_timeout(Some(t.max(Duration::from_millis(1))))?;
                }
                None => sock.set_nonblocking(true)?,
            }
            match self.stream.ssl_read(buf) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.code() == ErrorCode::WANT_READ => Ok(None),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => Err(io::ErrorKind::ConnectionAborted.into()),
                // A timeout, or a record that did not decrypt (dropped, as DTLS does).
                Err(_) => Ok(None),
            }
        }
    }
}
