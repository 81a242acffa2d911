//! Control messages between nodes, as prost messages.
//!
//! They travel as UDP datagrams on the cluster network (one message per datagram), each
//! sealed with the cluster key ([`crate::seal`]): the envelope below is the sealed plaintext,
//! decoded only after the seal opened. The schema
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
//!     SynRecvQuery syn_recv_query = 13;   // a new master asks for SYN-RECV sockets
//!     SynRecvAnswer syn_recv_answer = 14; // a member's answer
//!     ControlRequest control_request = 15; // a control-socket request carried to its target
//!     ControlAnswer control_answer = 16;   // the target's reply
//!   }
//! }
//! // A `tdscctl` request that a node's control socket took but another node must carry out
//! // (the Raft leader, or the node a weight or drain is for). Older daemons do not know these
//! // bodies and drop them (`undecodable`); the asking node then answers with a timeout.
//! message ControlRequest {
//!   uint64 nonce = 1;    // echoed in the answer
//!   string request = 2;  // one control-socket request line (JSON), at most 4096 bytes
//! }
//! message ControlAnswer {
//!   uint64 nonce = 1;    // the request's nonce
//!   string reply = 2;    // one control-socket reply line (JSON), at most 60 KiB
//! }
//! message SynRecvQuery { uint64 nonce = 1; }
//! message SynRecvAnswer {
//!   uint64 nonce = 1;               // the query's nonce
//!   repeated PeerAddr sockets = 2;  // remote address + port of each SYN-RECV socket on the VIP
//!   bool truncated = 3;             // more sockets than fit one datagram
//! }
//! message PeerAddr { bytes addr = 1; uint32 port = 2; } // addr: 4 or 16 bytes
//!
//! // The data of a normal Raft log entry.
//! message RaftCommand { oneof command { RecordBatch records = 1; } }
//! message RecordBatch { repeated SynRecord records = 1; }
//! message SynRecord {
//!   bytes client = 1;   // 4 or 16 bytes
//!   uint32 port = 2;
//!   uint32 isn = 3;
//!   uint32 node = 4;    // node id (not a view index)
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
//!   bool unhealthy = 7;         // a health check of the node's application fails
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
    #[prost(oneof = "Body", tags = "10, 11, 12, 13, 14, 15, 16")]
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
    #[prost(message, tag = "13")]
    SynRecvQuery(SynRecvQuery),
    #[prost(message, tag = "14")]
    SynRecvAnswer(SynRecvAnswer),
    #[prost(message, tag = "15")]
    ControlRequest(ControlRequest),
    #[prost(message, tag = "16")]
    ControlAnswer(ControlAnswer),
}

/// A control-socket request carried over the cluster channel to the node that must act on
/// it (see the module docs). The receiver checks it exactly as a request from its own socket.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ControlRequest {
    /// Echoed in the answer, so that the asking node matches answer and request.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
    /// One control-socket request line (JSON), at most [`MAX_CONTROL_REQUEST`] bytes.
    #[prost(string, tag = "2")]
    pub request: String,
}

/// The target's answer to a [`ControlRequest`].
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ControlAnswer {
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
    /// One control-socket reply line (JSON), at most [`MAX_CONTROL_ANSWER`] bytes.
    #[prost(string, tag = "2")]
    pub reply: String,
}

/// The longest request line a [`ControlRequest`] may carry: the control socket's own limit.
pub const MAX_CONTROL_REQUEST: usize = 4096;

/// The longest reply line a [`ControlAnswer`] may carry: a status of 64 nodes is about
/// 20 kB, and the envelope must stay inside one datagram ([`MAX_DATAGRAM`]).
pub const MAX_CONTROL_ANSWER: usize = 60 * 1024;

/// Tells a node that the sender's membership no longer has it (see the module docs).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Removed {
    #[prost(uint64, tag = "1")]
    pub index: u64,
    #[prost(uint32, repeated, tag = "2")]
    pub voters: Vec<u32>,
}

/// A new master asks every member for its SYN-RECV sockets on the VIP (paper §3.5).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SynRecvQuery {
    /// Echoed in the answer, so answers to an older query are told apart.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

/// Remote (client) address and port of one socket.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PeerAddr {
    /// 4 (IPv4) or 16 (IPv6) bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub addr: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SynRecvAnswer {
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
    #[prost(message, repeated, tag = "2")]
    pub sockets: Vec<PeerAddr>,
    /// The member held more SYN-RECV sockets than [`MAX_SYN_RECV_PER_ANSWER`].
    #[prost(bool, tag = "3")]
    pub truncated: bool,
}

/// Sockets per answer: about 14 bytes each (IPv6: 26), far inside one datagram.
pub const MAX_SYN_RECV_PER_ANSWER: usize = 2048;

/// The data of a normal Raft log entry. A oneof, so new kinds of entry can be added.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RaftCommand {
    #[prost(oneof = "Command", tags = "1")]
    pub command: Option<Command>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Command {
    #[prost(message, tag = "1")]
    Records(RecordBatch),
}

/// SYN-forward records the master made since its last batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordBatch {
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<SynRecord>,
}

/// Where one SYN went: client address and port, ISN, and the chosen node's id.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SynRecord {
    /// 4 (IPv4) or 16 (IPv6) bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub client: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub port: u32,
    #[prost(uint32, tag = "3")]
    pub isn: u32,
    #[prost(uint32, tag = "4")]
    pub node: u32,
}

/// Records per batch: one Raft entry of at most about 20 kB (IPv6), so that a Raft message
/// carrying one entry always fits a datagram.
pub const MAX_RECORDS_PER_BATCH: usize = 512;

/// Encodes a 4- or 16-byte address field.
pub fn addr_bytes(a: &std::net::IpAddr) -> Vec<u8> {
    match a {
        std::net::IpAddr::V4(v) => v.octets().to_vec(),
        std::net::IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// Decodes a 4- or 16-byte address field; anything else is `None`.
pub fn addr_from(b: &[u8]) -> Option<std::net::IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Some(std::net::IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from)
}

impl RaftCommand {
    pub fn records(records: Vec<SynRecord>) -> Self {
        RaftCommand {
            command: Some(Command::Records(RecordBatch { records })),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn from_bytes(buf: &[u8]) -> Result<Self, ControlError> {
        Ok(RaftCommand::decode(buf)?)
    }
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
    /// A `[[health.check]]` of the node's application fails: it takes no new connections.
    /// Absent (false) from older senders and from nodes without checks.
    #[prost(bool, tag = "7")]
    pub unhealthy: bool,
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
            unhealthy: true,
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
    fn syn_recv_query_and_answer_round_trip() {
        let q = Envelope {
            from: 2,
            term: 3,
            body: Some(Body::SynRecvQuery(SynRecvQuery { nonce: 7 })),
        };
        assert_eq!(Envelope::from_bytes(&q.to_bytes()).unwrap(), q);
        let a = Envelope {
            from: 1,
            term: 3,
            body: Some(Body::SynRecvAnswer(SynRecvAnswer {
                nonce: 7,
                sockets: vec![PeerAddr {
                    addr: vec![192, 0, 2, 101],
                    port: 40000,
                }],
                truncated: false,
            })),
        };
        assert_eq!(Envelope::from_bytes(&a.to_bytes()).unwrap(), a);
    }

    #[test]
    fn control_request_and_answer_round_trip() {
        let q = Envelope {
            from: 2,
            term: 4,
            body: Some(Body::ControlRequest(ControlRequest {
                nonce: u64::MAX,
                request: r#"{"cmd":"drain","node":3}"#.into(),
            })),
        };
        assert_eq!(Envelope::from_bytes(&q.to_bytes()).unwrap(), q);
        let a = Envelope {
            from: 3,
            term: 4,
            body: Some(Body::ControlAnswer(ControlAnswer {
                nonce: u64::MAX,
                reply: "x".repeat(MAX_CONTROL_ANSWER),
            })),
        };
        let bytes = a.to_bytes();
        assert!(bytes.len() < MAX_DATAGRAM - 64, "{} bytes", bytes.len());
        assert_eq!(Envelope::from_bytes(&bytes).unwrap(), a);
    }

    /// A full batch of IPv6 records stays far below a datagram, so a Raft message carrying
    /// one entry fits.
    #[test]
    fn record_batches_round_trip_and_stay_small() {
        let v6: std::net::IpAddr = "2001:db8::ffff:ffff".parse().unwrap();
        let recs = (0..MAX_RECORDS_PER_BATCH)
            .map(|i| SynRecord {
                client: addr_bytes(&v6),
                port: 65535,
                isn: u32::MAX - u32::try_from(i).unwrap(),
                node: 4000,
            })
            .collect();
        let cmd = RaftCommand::records(recs);
        let bytes = cmd.to_bytes();
        assert!(bytes.len() < 24 * 1024, "{} bytes", bytes.len());
        assert_eq!(RaftCommand::from_bytes(&bytes).unwrap(), cmd);
        assert_eq!(addr_from(&addr_bytes(&v6)), Some(v6));
        assert_eq!(addr_from(&[1, 2, 3]), None);
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
