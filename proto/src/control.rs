//! Control messages between nodes, as prost messages.
//!
//! They travel as UDP datagrams on the cluster network (one message per datagram). The schema
//! is written with prost's derive macros rather than generated from a `.proto` file, so the
//! build needs no `protoc`; the equivalent schema is:
//!
//! ```proto
//! message Envelope {
//!   uint32 from = 1;            // sender's node id
//!   uint64 term = 2;            // sender's view of the election term
//!   oneof body {
//!     NodeReport report = 10;   // liveness + load, every report interval
//!     bytes raft = 11;          // an opaque raft-rs message (reserved for the election)
//!     Removed removed = 12;     // "you are no longer a member" (see below)
//!   }
//! }
//! // Sent (at most once a report interval) to a node whose reports or Raft messages arrive
//! // although the sender has applied its removal: such a node missed the commit that removed
//! // it (it was down, or the one message was lost), and the leader no longer talks to it.
//! message Removed {
//!   uint64 index = 1;           // Raft log index of the sender's last membership change
//!   repeated uint32 voters = 2; // the voters after it
//! }
//! message NodeReport {
//!   uint32 established = 1;     // ESTABLISHED TCP sockets on the VIP
//!   uint32 syn_recv = 2;        // SYN-RECV request sockets on the VIP
//!   uint64 seq = 3;             // report sequence number (monotonic per daemon run)
//!   bool draining = 4;          // the node asks for no new connections
//!   uint32 load = 5;            // the node's load figure, milli-units (least-load policy)
//!   optional uint32 weight = 6; // the node's weight; absent from older senders
//! }
//! // Not a datagram: the context of a Raft ConfChange that adds a node, replicated in the
//! // Raft log and persisted with the Raft state.
//! message MemberInfo {
//!   uint32 id = 1;              // the node's id
//!   bytes address = 2;          // its cluster-network address: 4 (IPv4) or 16 (IPv6) bytes
//!   uint32 weight = 3;          // its weight when it joins
//! }
//! ```

use prost::Message;

/// Largest datagram a node will accept; anything longer is refused unread.
pub const MAX_DATAGRAM: usize = 64 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    #[prost(uint32, tag = "1")]
    pub from: u32,
    #[prost(uint64, tag = "2")]
    pub term: u64,
    #[prost(oneof = "Body", tags = "10, 11, 12")]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "10")]
    Report(NodeReport),
    #[prost(bytes, tag = "11")]
    Raft(Vec<u8>),
    #[prost(message, tag = "12")]
    Removed(Removed),
}

/// Tells a node that the sender's membership no longer has it (see the module docs).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Removed {
    #[prost(uint64, tag = "1")]
    pub index: u64,
    #[prost(uint32, repeated, tag = "2")]
    pub voters: Vec<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct NodeReport {
    #[prost(uint32, tag = "1")]
    pub established: u32,
    #[prost(uint32, tag = "2")]
    pub syn_recv: u32,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(bool, tag = "4")]
    pub draining: bool,
    #[prost(uint32, tag = "5")]
    pub load: u32,
    #[prost(uint32, optional, tag = "6")]
    pub weight: Option<u32>,
}

/// The context of a Raft conf change that adds a node: who it is and where it listens.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MemberInfo {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// 4 bytes (IPv4) or 16 bytes (IPv6), network order.
    #[prost(bytes = "vec", tag = "2")]
    pub address: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub weight: u32,
}

impl MemberInfo {
    pub fn new(id: u32, address: std::net::IpAddr, weight: u32) -> Self {
        let address = match address {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        };
        MemberInfo {
            id,
            address,
            weight,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn from_bytes(buf: &[u8]) -> Result<Self, ControlError> {
        Ok(MemberInfo::decode(buf)?)
    }

    /// The address, or None when it is neither 4 nor 16 bytes long.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        if let Ok(a) = <[u8; 4]>::try_from(self.address.as_slice()) {
            return Some(a.into());
        }
        <[u8; 16]>::try_from(self.address.as_slice())
            .ok()
            .map(Into::into)
    }
}

/// Why a control datagram was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("datagram is not a valid envelope")]
    Decode(#[from] prost::DecodeError),
    #[error("envelope from node {from} has no body")]
    Empty { from: u32 },
}

impl Envelope {
    pub fn report(from: u32, term: u64, report: NodeReport) -> Self {
        Envelope {
            from,
            term,
            body: Some(Body::Report(report)),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes one datagram. An envelope without a body is refused: every sender sets one.
    pub fn from_bytes(buf: &[u8]) -> Result<Self, ControlError> {
        let env = Envelope::decode(buf)?;
        if env.body.is_none() {
            return Err(ControlError::Empty { from: env.from });
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trip() {
        let r = NodeReport {
            established: 12,
            syn_recv: 3,
            seq: 99,
            draining: true,
            load: 2500,
            weight: Some(0),
        };
        let env = Envelope::report(2, 5, r);
        let back = Envelope::from_bytes(&env.to_bytes()).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.body, Some(Body::Report(r)));
    }

    #[test]
    fn raft_bytes_are_carried_opaquely() {
        let env = Envelope {
            from: 1,
            term: 9,
            body: Some(Body::Raft(vec![0, 1, 2, 255])),
        };
        assert_eq!(Envelope::from_bytes(&env.to_bytes()).unwrap(), env);
    }

    #[test]
    fn removed_notice_round_trip() {
        let env = Envelope {
            from: 1,
            term: 3,
            body: Some(Body::Removed(Removed {
                index: 42,
                voters: vec![1, 2],
            })),
        };
        assert_eq!(Envelope::from_bytes(&env.to_bytes()).unwrap(), env);
    }

    #[test]
    fn member_info_round_trip() {
        for a in ["198.51.100.13", "2001:db8::13"] {
            let m = MemberInfo::new(3, a.parse().unwrap(), 7);
            let back = MemberInfo::from_bytes(&m.to_bytes()).unwrap();
            assert_eq!(back, m);
            assert_eq!(back.ip(), Some(a.parse().unwrap()));
        }
        let bad = MemberInfo {
            id: 1,
            address: vec![1, 2, 3],
            weight: 1,
        };
        assert_eq!(bad.ip(), None);
    }

    #[test]
    fn garbage_and_empty_are_refused() {
        assert!(matches!(
            Envelope::from_bytes(&[0xff, 0xff, 0xff]),
            Err(ControlError::Decode(_))
        ));
        let empty = Envelope {
            from: 4,
            term: 0,
            body: None,
        };
        assert!(matches!(
            Envelope::from_bytes(&empty.to_bytes()),
            Err(ControlError::Empty { from: 4 })
        ));
    }
}
