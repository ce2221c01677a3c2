// tapproof patch (see TAPPROOF-PATCH.md): URI name constraints, RFC 5280 section 4.2.1.10.
//
// Permission to use, copy, modify, and/or distribute this software for any
// purpose with or without fee is hereby granted, provided that the above
// copyright notice and this permission notice appear in all copies.
//
// THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHORS DISCLAIM ALL WARRANTIES
// WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF
// MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHORS BE LIABLE FOR
// ANY SPECIAL, DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES
// WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN
// ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF
// OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THIS SOFTWARE.

//! RFC 5280, section 4.2.1.10, on URIs:
//!
//! > For URIs, the constraint applies to the host part of the name. The constraint MUST be
//! > specified as a fully qualified domain name and MAY specify a host or a domain. Examples
//! > would be "host.example.com" and ".example.com". When the constraint begins with a period,
//! > it MAY be expanded with one or more labels. That is, the constraint ".example.com" is
//! > satisfied by both host.example.com and my.host.example.com. However, the constraint
//! > ".example.com" is not satisfied by "example.com". When the constraint does not begin with
//! > a period, it specifies a host. If a constraint is applied to the uniformResourceIdentifier
//! > name form and a subsequent certificate includes a subjectAltName extension with a
//! > uniformResourceIdentifier that does not include an authority component with a host name
//! > specified as a fully qualified domain name (e.g., if the URI either does not include an
//! > authority component or includes an authority component in which the host name is
//! > specified as an IP address), then the application MUST reject the certificate.
//!
//! For a SPIFFE ID (`spiffe://trust-domain/path`) the host is the trust domain, so a
//! constraint `example.org` confines an intermediate to that trust domain.
//!
//! Everything this module cannot read is an error, never a match or a non-match: the caller
//! turns an error into a rejection in permitted and excluded subtrees alike (fail closed).

use crate::error::Error;

/// Whether the URI `name` (a subjectAltName) lies in the subtree `constraint` (a
/// uniformResourceIdentifier base of a name constraint).
pub(super) fn presented_id_matches_constraint(
    name: untrusted::Input<'_>,
    constraint: untrusted::Input<'_>,
) -> Result<bool, Error> {
    let host = uri_host(name.as_slice_less_safe()).ok_or(Error::NameConstraintViolation)?;
    let base = constraint.as_slice_less_safe();
    if !is_fqdn(base.strip_prefix(b".").unwrap_or(base)) {
        return Err(Error::NameConstraintViolation);
    }
    Ok(match base.strip_prefix(b".") {
        // A domain: one or more labels in front of it, never the domain itself.
        Some(_) => host.len() > base.len() && host[host.len() - base.len()..].eq_ignore_ascii_case(base),
        // A host: exactly it.
        None => host.eq_ignore_ascii_case(base),
    })
}

/// The host of `scheme://[userinfo@]host[:port][/path][?query][#fragment]` (RFC 3986) when it
/// is a fully qualified domain name; None when there is no authority or the host is an IP
/// address, empty or malformed.
fn uri_host(uri: &[u8]) -> Option<&[u8]> {
    let colon = uri.iter().position(|&b| b == b':')?;
    let (scheme, rest) = (&uri[..colon], &uri[colon + 1..]);
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let rest = rest.strip_prefix(b"//")?;
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    let host_port = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    if host_port.first() == Some(&b'[') {
        return None; // an IP literal
    }
    let host = match host_port.iter().position(|&b| b == b':') {
        Some(c) if host_port[c + 1..].iter().all(u8::is_ascii_digit) => &host_port[..c],
        Some(_) => return None,
        None => host_port,
    };
    if !is_fqdn(host) || host.split(|&b| b == b'.').all(|l| l.iter().all(u8::is_ascii_digit)) {
        return None; // not a name, or an IPv4 address
    }
    Some(host)
}

/// Dot-separated labels of letters, digits and hyphens (and underscores, which SPIFFE trust
/// domains allow), none empty, none starting or ending with a hyphen.
fn is_fqdn(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.first() != Some(&b'-')
                && label.last() != Some(&b'-')
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

// Tests: crates/tls/tests/name_constraints.rs, on real chains (this crate's own tests need
// fixture files the published package does not ship).
