//! Control requests: every line the control socket reads is parsed as a `Request` (the
//! daemon's side) and, since `tdscctl` reads the daemon's lines, as a `Reply`. A parsed
//! request encodes back to one that parses equal; its policy name is looked up as the daemon
//! does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tdscd::admin::protocol::{Reply, Request};
use tdscd::config::PolicyName;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    for line in text.lines() {
        if let Ok(req) = serde_json::from_str::<Request>(line) {
            let again: Request =
                serde_json::from_str(&serde_json::to_string(&req).expect("encodes"))
                    .expect("re-encoded request parses");
            assert_eq!(again, req, "request changed in a round trip");
            if let Request::PolicySet { policy } = &req {
                let _ = PolicyName::parse(policy);
            }
        }
        if let Ok(reply) = serde_json::from_str::<Reply>(line) {
            let _ = serde_json::to_string(&reply).expect("encodes");
        }
    }
});
