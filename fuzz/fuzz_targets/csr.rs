//! The server's CSR checks (join and signing): any bytes, as DER or PEM, give a public key or a
//! refusal naming what is wrong, never a panic; a key is only ever returned for the expected ID
//! (or a CSR without SANs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let td = tapproof_identity::TrustDomain::new("example.org").unwrap();
    let expected = td.node_id("web-1").unwrap();
    let _ = tapproof_identity::check_csr(data, &expected);
    // The same bytes as the PEM text agents send.
    let mut pem = b"-----BEGIN CERTIFICATE REQUEST-----\n".to_vec();
    pem.extend_from_slice(data);
    pem.extend_from_slice(b"\n-----END CERTIFICATE REQUEST-----\n");
    let _ = tapproof_identity::check_csr(&pem, &expected);
});
