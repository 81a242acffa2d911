//! The operator's way in: the node-local control socket ([`server`]) and the JSON-lines
//! control protocol it speaks ([`protocol`]), of which `tdscctl` is a thin client.

pub mod protocol;
pub mod route;
pub mod server;
