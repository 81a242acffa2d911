//! Every byte that crosses between tcp-dsc nodes.
//!
//! Two kinds of traffic run on the cluster network:
//!
//! * **Forwarded SYNs** ([`forward`]): the master wraps a client's SYN in a small versioned
//!   header and sends it as IP protocol 253 to the node its policy chose. The receiver checks
//!   the header and re-injects the segment into its own TCP stack.
//! * **Control messages** ([`control`]): prost messages in UDP datagrams — load reports and
//!   heartbeats now, opaque Raft messages for the election.
//!
//! The cluster keyring ([`seal`]) seals datagrams with an AEAD, tags forwards, and gives
//! receivers a replay window per sender.
//!
//! Nothing here opens a socket; the daemon does the I/O.
//!
//! ```
//! use tdsc_proto::forward::{ForwardHeader, ForwardPacket};
//! use tdsc_proto::seal::Keyring;
//! let ring = Keyring::parse(&Keyring::generate_text(1).unwrap()).unwrap();
//! let header = ForwardHeader {
//!     term: 1,
//!     origin: 1,
//!     counter: 1,
//!     client: "192.0.2.101".parse().unwrap(),
//!     vip: "192.0.2.1".parse().unwrap(),
//! };
//! let mut syn = [0u8; 20];
//! syn[12] = 5 << 4; // data offset: 5 words
//! syn[13] = 0x02; // SYN
//! let mut wire = [0u8; 128];
//! let n = header.encode_packet(&syn, &ring, &mut wire).unwrap();
//! let packet = ForwardPacket::decode(&wire[..n]).unwrap();
//! packet.verify(&ring).unwrap();
//! assert_eq!(packet.header, header);
//! assert_eq!(packet.segment, &syn[..]);
//! ```

pub mod control;
pub mod forward;
pub mod seal;

pub use forward::FORWARD_PROTO;
