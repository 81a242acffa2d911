//! What a node changes on, and asks of, its own host: the VIP, MAC and sysctls ([`setup`])
//! over a small [`netlink`] client, socket counts ([`sockdiag`]), and the load figure
//! ([`load`]).

pub mod load;
pub mod netlink;
pub mod setup;
pub mod sockdiag;
pub mod state;
