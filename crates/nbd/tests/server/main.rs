//! End-to-end tests: the real server on 127.0.0.1:0 and a unix socket, driven by a raw-socket client.

mod common;
mod handshake;
mod lifecycle;
mod malformed;
mod transmission;
