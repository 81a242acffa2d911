//! The crate's one error type.

use std::io;

/// Everything that can go wrong while checking a spec or talking to nf_tables.
///
/// Messages do not repeat their source; print the whole chain to see the OS error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`crate::ClusterSpec`] field cannot be turned into a valid ruleset.
    #[error("invalid cluster spec: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },

    /// The netfilter netlink socket could not be opened or configured.
    #[error("could not open a netfilter netlink socket")]
    Open(#[source] io::Error),

    /// Sending a batch or a dump request failed.
    #[error("could not send to the netfilter netlink socket")]
    Send(#[source] io::Error),

    /// Receiving acknowledgements or dump replies failed.
    #[error("could not receive from the netfilter netlink socket")]
    Recv(#[source] io::Error),

    /// The kernel refused a message; the whole batch was rolled back.
    #[error("the kernel rejected {what}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Rejected {
        /// Which message of the batch, e.g. `rule 3 of inet tdsc input`.
        what: String,
        /// The kernel's extended-ack message, when it sent one.
        detail: Option<String>,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
    },

    /// The kernel processed the batch but some acknowledgements never arrived.
    #[error("{missing} of {expected} acknowledgements missing")]
    MissingAck {
        /// How many messages were not acknowledged.
        missing: usize,
        /// How many acknowledgements were expected.
        expected: usize,
    },

    /// A netlink message from the kernel could not be parsed.
    #[error("malformed netlink message: {reason}")]
    Malformed {
        /// What was wrong with it.
        reason: &'static str,
    },

    /// What the kernel holds differs from what we applied.
    #[error("installed ruleset differs from the applied one: {diff}")]
    Mismatch {
        /// The first difference found.
        diff: String,
    },

    /// A rule we look up by its comment is not installed.
    #[error("no rule commented {comment:?} in table inet tdsc")]
    RuleNotFound {
        /// The comment searched for.
        comment: &'static str,
    },
}
