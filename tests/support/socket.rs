//! A GraphQL-over-WebSocket client for the suites: both subprotocols the
//! kernel speaks, `connection_init` with a token, subscriptions' frames.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::kernel::RunningKernel;

/// The two WebSocket subprotocols the server speaks.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// `graphql-transport-ws` (the graphql-ws library).
    TransportWs,
    /// `graphql-ws` (the older subscriptions-transport-ws).
    LegacyWs,
}

/// What the server sent for a subscription.
#[derive(Debug)]
pub enum Frame {
    Next(Value),
    Error(Value),
    Complete,
}

/// A client of `/graphql` over WebSocket.
pub struct Socket {
    pub stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    protocol: Protocol,
}

/// Longest a test waits for one frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);

impl Socket {
    /// Connects and sends `connection_init` with `payload`: the socket once
    /// acknowledged, or why the server refused it.
    pub async fn connect(
        kernel: &RunningKernel,
        protocol: Protocol,
        payload: Value,
    ) -> anyhow::Result<Result<Socket, String>> {
        Self::connect_from(kernel, protocol, payload, None).await
    }

    /// [`connect`](Self::connect) as a browser on the page of `origin` would.
    pub async fn connect_from(
        kernel: &RunningKernel,
        protocol: Protocol,
        payload: Value,
        origin: Option<&str>,
    ) -> anyhow::Result<Result<Socket, String>> {
        let mut request = format!("ws://{}/graphql", kernel.address).into_client_request()?;
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse()?);
        }
        let name = match protocol {
            Protocol::TransportWs => "graphql-transport-ws",
            Protocol::LegacyWs => "graphql-ws",
        };
        request
            .headers_mut()
            .insert("sec-websocket-protocol", name.parse()?);
        let (stream, _) = tokio_tungstenite::connect_async(request).await?;
        let mut socket = Socket { stream, protocol };
        socket
            .send(json!({ "type": "connection_init", "payload": payload }))
            .await?;
        loop {
            match socket.receive().await? {
                Err(reason) => return Ok(Err(reason)),
                Ok(message) => match message["type"].as_str() {
                    Some("connection_ack") => return Ok(Ok(socket)),
                    Some("ka" | "ping") => continue,
                    _ => return Ok(Err(message.to_string())),
                },
            }
        }
    }

    pub async fn send(&mut self, message: Value) -> anyhow::Result<()> {
        self.stream
            .send(Message::Text(message.to_string().into()))
            .await?;
        Ok(())
    }

    /// The next JSON message, or the close reason.
    pub async fn receive(&mut self) -> anyhow::Result<Result<Value, String>> {
        loop {
            let message = tokio::time::timeout(FRAME_TIMEOUT, self.stream.next())
                .await
                .context("no frame from the server")?;
            match message {
                None => return Ok(Err("closed".into())),
                Some(Err(error)) => return Ok(Err(error.to_string())),
                Some(Ok(Message::Text(text))) => return Ok(Ok(serde_json::from_str(&text)?)),
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Err(
                        frame.map_or("closed".into(), |f| format!("{} {}", f.code, f.reason))
                    ));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn subscribe(
        &mut self,
        id: &str,
        query: &str,
        variables: Value,
    ) -> anyhow::Result<()> {
        let kind = match self.protocol {
            Protocol::TransportWs => "subscribe",
            Protocol::LegacyWs => "start",
        };
        self.send(json!({ "id": id, "type": kind, "payload": { "query": query, "variables": variables } }))
            .await
    }

    pub async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            let message = match self.receive().await? {
                Ok(message) => message,
                Err(reason) => bail!("the socket closed: {reason}"),
            };
            match message["type"].as_str() {
                // async-graphql sends a resolver's refusal as a result with errors.
                Some("next" | "data") => {
                    let payload = message["payload"].clone();
                    return Ok(match payload.get("errors") {
                        Some(errors) if errors.as_array().is_some_and(|e| !e.is_empty()) => {
                            Frame::Error(errors.clone())
                        }
                        _ => Frame::Next(payload),
                    });
                }
                Some("error") => {
                    let payload = &message["payload"];
                    let errors = if payload.is_array() {
                        payload.clone()
                    } else {
                        payload
                            .get("errors")
                            .cloned()
                            .unwrap_or_else(|| json!([payload]))
                    };
                    return Ok(Frame::Error(errors));
                }
                Some("complete") => return Ok(Frame::Complete),
                Some("ka" | "ping" | "pong") => continue,
                other => bail!("unexpected message {other:?}: {message}"),
            }
        }
    }
}
