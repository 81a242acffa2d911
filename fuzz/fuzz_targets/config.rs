//! Config parsing (`tdscd::config::Config::parse`): any text is a configuration or a typed
//! error, never a panic, and a parsed one answers the questions the daemon asks of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tdscd::config::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(c) = Config::parse(text) {
        assert!(c.self_index() < c.nodes.len(), "self index out of range");
        let _ = c.self_address();
        let _ = c.egress_mac();
    }
});
