//! Any bytes as a pushed routing message: decoding and conversion accept it or name the
//! field they refuse, never panic; what converts survives a second trip over the wire.
#![no_main]

use isthmus_core::routing::ServiceRouting;
use isthmus_proto::routing as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = pb::ServiceRouting::decode(data) else { return };
    match ServiceRouting::try_from(wire) {
        Ok(routing) => {
            let again = pb::ServiceRouting::from(&routing).encode_to_vec();
            let back = pb::ServiceRouting::decode(again.as_slice()).expect("own encoding decodes");
            assert_eq!(ServiceRouting::try_from(back).as_ref(), Ok(&routing));
        }
        Err(e) => assert!(!e.field.is_empty()),
    }
});
