//! A host websocket driven frame by frame by the test: the server's side of the host protocol
//! on a real socket, without a hostd.

use anyhow::{bail, Context, Result};
use berth_protocol::host::{HostMessage, HostVm, ImageCapacity, ServerToHost};
use berth_protocol::HostId;
use berth_server::app::Server;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A raw host socket: these tests speak the host protocol frame by frame, bad frames included.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn host_socket(s: &Server, token: &str) -> Result<Ws> {
    let mut req = format!("ws://{}/v1/hosts", s.addr).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

pub fn register(host: &str, vms: Vec<HostVm>) -> HostMessage {
    register_with(host, vms, vec![])
}

/// A `register` that also carries `outbox` reports.
pub fn register_with(host: &str, vms: Vec<HostVm>, outbox: Vec<HostMessage>) -> HostMessage {
    HostMessage::Register {
        v: 1,
        host: HostId::new(host).expect("id"),
        accel: "tcg".into(),
        driver: "qemu".into(),
        gateway: "ws://127.0.0.1:7071".into(),
        max_vms: 4,
        images: vec![ImageCapacity {
            name: "arena".into(),
            docked: true,
            warm: 0,
            running: 0,
            memory_mib: 128,
            vcpus: 1,
            substrate: None,
        }],
        vms,
        region: None,
        zone: None,
        peer: None,
        outbox,
    }
}

/// An empty heartbeat (no images, not draining).
pub fn heartbeat() -> HostMessage {
    HostMessage::Heartbeat {
        images: vec![],
        draining: false,
    }
}

pub async fn send(ws: &mut Ws, m: &HostMessage) -> Result<()> {
    ws.send(Message::Text(serde_json::to_string(m)?.into()))
        .await?;
    Ok(())
}

pub async fn recv(ws: &mut Ws) -> Result<ServerToHost> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .context("no message")?
        {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(Message::Close(f))) => bail!("closed: {f:?}"),
            Some(Ok(_)) => continue,
            other => bail!("ended: {other:?}"),
        }
    }
}

pub async fn expect_error(ws: &mut Ws, code: &str) -> Result<()> {
    match recv(ws).await? {
        ServerToHost::Error { code: c, .. } if c == code => Ok(()),
        other => bail!("expected error {code}, got {other:?}"),
    }
}

pub async fn close_of(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map_or(0, |f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            _ => return 0,
        }
    }
}
