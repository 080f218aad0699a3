//! Any text as a CSR: the CA refuses it or signs exactly the proved identity.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::ca::CertificateAuthority;
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| CertificateAuthority::new_root("fuzz").expect("root").0)
}

fuzz_target!(|data: &[u8]| {
    let Ok(pem) = std::str::from_utf8(data) else { return };
    let proved = SpiffeId::new("fuzz", "ns", "sa");
    if let Ok(chain) = ca().sign_leaf(pem, &proved, Duration::from_secs(60)) {
        let leaf = isthmus_core::tls::parse_certs(&chain[0]).expect("issued PEM parses");
        assert_eq!(isthmus_core::tls::cert_identity(&leaf[0]).expect("has an id"), proved);
    }
});
