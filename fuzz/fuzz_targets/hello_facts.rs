//! A hello as it arrives on the wire (protobuf bytes), converted and
//! checked as the controller does before anything is stored: no panic,
//! and what passes the checks holds no control character or newline.
#![no_main]
use ddisco_controller::registry::{Facts, Hello, untrusted};
use ddisco_proto::v1 as api;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = api::Hello::decode(data) else { return };
    let hello: Hello = msg.into();
    let facts: &Facts = &hello.facts;
    if untrusted::check_facts(facts).is_ok() {
        assert!(!facts.hostname.contains(['\n', '\r', ' ']));
        assert!(facts.addresses.iter().all(|a| a.parse::<std::net::IpAddr>().is_ok()));
    }
});
