//! What a node changes on, and asks of, its own host: the VIP, MAC and sysctls ([`setup`])
//! over a small [`netlink`] client, socket counts ([`sockdiag`]), the load figure
//! ([`load`]), and what it tells systemd ([`notify`]).

pub mod load;
pub mod netlink;
pub mod notify;
pub mod setup;
pub mod sockdiag;
pub mod state;
