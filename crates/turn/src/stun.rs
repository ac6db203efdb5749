//! STUN replies the driver builds itself instead of asking turn-server-proto.

use std::net::SocketAddr;

use stun_proto::types::attribute::{ErrorCode, Fingerprint, Nonce, Realm, XorMappedAddress};
use stun_proto::types::message::{Message, MessageWriteVec};
use stun_proto::types::prelude::*;

/// The answer to a Binding request from `from`: success with
/// XOR-MAPPED-ADDRESS = `from`, or 420 when the request carries
/// comprehension-required attributes we do not know.
///
/// turn-server-proto 0.7.3 answers Binding too, but addresses the reply to its
/// own listen address instead of the client, so the driver never lets it see
/// Binding requests.
pub(crate) fn binding_response(req: &Message<'_>, from: SocketAddr) -> Vec<u8> {
    if let Some(err) = Message::check_attribute_types(req, &[Fingerprint::TYPE], &[], MessageWriteVec::new())
    {
        return err.finish();
    }
    let mut resp = Message::builder_success(req, MessageWriteVec::new());
    resp.add_attribute(&XorMappedAddress::new(from, req.transaction_id()))
        .expect("a fresh message has room for XOR-MAPPED-ADDRESS");
    resp.add_fingerprint().expect("a fresh message has no FINGERPRINT yet");
    resp.finish()
}

/// An unsigned error response to `req`. `realm` and `nonce` are added when
/// given (a 401 must carry both, RFC 8489 §9.2.4).
pub(crate) fn error_response(
    req: &Message<'_>,
    code: u16,
    realm: Option<&str>,
    nonce: Option<&str>,
) -> Vec<u8> {
    let mut resp = Message::builder_error(req, MessageWriteVec::new());
    if let Ok(error) = ErrorCode::builder(code).build() {
        let _ = resp.add_attribute(&error);
    }
    if let Some(realm) = realm.and_then(|r| Realm::new(r).ok()) {
        let _ = resp.add_attribute(&realm);
    }
    if let Some(nonce) = nonce.and_then(|n| Nonce::new(n).ok()) {
        let _ = resp.add_attribute(&nonce);
    }
    let _ = resp.add_fingerprint();
    resp.finish()
}

/// An error response to `req` signed with the requester's long-term key
/// (RFC 8656 §7.2: the answer to an authenticated request is authenticated).
pub(crate) fn signed_error_response(
    req: &Message<'_>,
    code: u16,
    key: &stun_proto::types::message::MessageIntegrityCredentials,
) -> Vec<u8> {
    let mut resp = Message::builder_error(req, MessageWriteVec::new());
    if let Ok(error) = ErrorCode::builder(code).build() {
        let _ = resp.add_attribute(&error);
    }
    let _ = resp.add_message_integrity(key, stun_proto::types::message::IntegrityAlgorithm::Sha1);
    let _ = resp.add_fingerprint();
    resp.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_proto::types::message::{BINDING, MessageClass};

    #[test]
    fn binding_response_mirrors_the_source() {
        let req = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
        let req = Message::from_bytes(&req).unwrap();
        let from: SocketAddr = "198.51.100.4:61000".parse().unwrap();
        let resp = binding_response(&req, from);
        let resp = Message::from_bytes(&resp).unwrap();
        assert!(resp.has_class(MessageClass::Success));
        assert!(resp.has_method(BINDING));
        assert_eq!(resp.transaction_id(), req.transaction_id());
        let mapped = resp.attribute::<XorMappedAddress>().unwrap();
        assert_eq!(mapped.addr(resp.transaction_id()), from);
    }

    #[test]
    fn error_response_carries_code_realm_and_nonce() {
        let req = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
        let req = Message::from_bytes(&req).unwrap();
        let resp = error_response(&req, ErrorCode::UNAUTHORIZED, Some("peerlink"), Some("abc"));
        let resp = Message::from_bytes(&resp).unwrap();
        assert!(resp.has_class(MessageClass::Error));
        assert_eq!(resp.attribute::<ErrorCode>().unwrap().code(), 401);
        assert_eq!(resp.attribute::<Realm>().unwrap().realm(), "peerlink");
        assert_eq!(resp.attribute::<Nonce>().unwrap().nonce(), "abc");
        let bare = error_response(&req, ErrorCode::ALLOCATION_MISMATCH, None, None);
        let bare = Message::from_bytes(&bare).unwrap();
        assert_eq!(bare.attribute::<ErrorCode>().unwrap().code(), 437);
        assert!(bare.attribute::<Realm>().is_err());
    }
}
