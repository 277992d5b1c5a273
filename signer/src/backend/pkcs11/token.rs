//! Operations on one PKCS#11 session: finding the token, logging in, generating, finding,
//! reading and destroying secp256k1 key pairs, signing.
//!
//! Everything here runs on a worker or keeper thread, never on the async runtime.

use alloy::primitives::{Address, B256};
use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use k256::ecdsa::VerifyingKey;
use secrecy::SecretString;

use super::errors::{Class, Loss, classify, pkcs11_error};
use crate::backend::{BackendError, KeyInfo, KeyRef};

/// DER of the secp256k1 OID 1.3.132.0.10, the only `CKA_EC_PARAMS` this backend accepts.
pub const SECP256K1_EC_PARAMS: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];

/// Bytes of random `CKA_ID` given to a new key pair.
const KEY_ID_LEN: u32 = 16;

/// Longest key label accepted (labels are for people and logs, not payloads).
const MAX_LABEL_LEN: usize = 128;

/// A failed operation, classified for the pool.
#[derive(Debug)]
pub(super) enum OpError {
    /// The session, login or device is gone: the pool must recover. `reason` names the PKCS#11
    /// function and return code.
    Lost {
        /// What was lost.
        loss: Loss,
        /// For the caller and `health()`.
        reason: String,
    },
    /// An object handle turned out stale.
    Stale(BackendError),
    /// A definitive answer for the caller.
    Fail(BackendError),
}

impl OpError {
    /// Classifies a cryptoki error from `function`.
    pub(super) fn ck(error: Error, function: Function) -> Self {
        let mapped = pkcs11_error(&error, function);
        match classify(&error) {
            Class::Lost(loss) => Self::Lost {
                loss,
                reason: mapped.to_string(),
            },
            Class::StaleHandle => Self::Stale(mapped),
            Class::Other => Self::Fail(mapped),
        }
    }

    /// The error the caller sees.
    pub(super) fn into_backend_error(self) -> BackendError {
        match self {
            Self::Lost { reason, .. } => BackendError::Unavailable(reason),
            Self::Stale(e) | Self::Fail(e) => e,
        }
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> Self {
        Self::Fail(e)
    }
}

/// The slot holding the token labelled `label`: exactly one must be present.
pub(super) fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, OpError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| OpError::ck(e, Function::GetSlotList))?;
    let mut found = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| OpError::ck(e, Function::GetTokenInfo))?;
        if info.label() == label {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(OpError::Fail(BackendError::TokenNotFound(label.to_owned()))),
        many => Err(OpError::Fail(BackendError::Unavailable(format!(
            "{} tokens are labelled {label:?}; refusing to guess",
            many.len()
        )))),
    }
}

/// Logs the user in on `session` (and so on every session of this process on the token).
///
/// A refused PIN is [`BackendError::LoginFailed`]; "already logged in" is success.
pub(super) fn login(session: &Session, token: &str, pin: &SecretString) -> Result<(), OpError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(Error::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::PinLocked),
            _,
        )) => Err(OpError::Fail(BackendError::LoginFailed {
            token: token.to_owned(),
            rv: super::errors::rv_name(&rv),
        })),
        Err(e) => Err(OpError::ck(e, Function::Login)),
    }
}

/// Whether `session` sees the user as logged in.
pub(super) fn is_logged_in(session: &Session) -> Result<bool, OpError> {
    let info = session
        .get_session_info()
        .map_err(|e| OpError::ck(e, Function::GetSessionInfo))?;
    Ok(matches!(
        info.session_state(),
        SessionState::RoUser | SessionState::RwUser
    ))
}

/// "Not found" — unless the session is not logged in, in which case private objects are merely
/// invisible and the login was lost.
pub(super) fn not_found(session: &Session, what: String) -> OpError {
    match is_logged_in(session) {
        Ok(true) => OpError::Fail(BackendError::KeyNotFound(what)),
        Ok(false) => OpError::Lost {
            loss: Loss::Login,
            reason: "the token session is no longer logged in".into(),
        },
        Err(e) => e,
    }
}

/// The label and decoded `CKA_ID` of a PKCS#11 key reference.
pub(super) fn pkcs11_ref(key: &KeyRef) -> Result<(&str, Vec<u8>), OpError> {
    #[allow(unreachable_patterns)] // other backends' references will be added to KeyRef
    match key {
        KeyRef::Pkcs11 { label, id } => {
            let id = hex::decode(id).map_err(|_| {
                OpError::Fail(BackendError::KeyNotFound(format!("{key}: id is not hex")))
            })?;
            Ok((label.as_str(), id))
        }
        _ => Err(OpError::Fail(BackendError::KeyNotFound(format!(
            "{key} is not a PKCS#11 key"
        )))),
    }
}

/// Generates a secp256k1 key pair labelled `label` with a random `CKA_ID`.
///
/// # Security
/// The private key is a token object, private, sensitive, never extractable, and can only sign
/// (no decrypt, derive, unwrap, sign-recover); it is not copyable. A label already in use on the
/// token is refused. The caller serialises generation so that two requests cannot both pass the
/// label check.
pub(super) fn generate(session: &Session, label: &str) -> Result<KeyInfo, OpError> {
    check_label(label)?;
    if !is_logged_in(session)? {
        return Err(not_found(session, label.to_owned()));
    }
    let existing = find(session, &[Attribute::Label(label.as_bytes().to_vec())])?;
    if !existing.is_empty() {
        return Err(OpError::Fail(BackendError::KeyExists(label.to_owned())));
    }
    let id = session
        .generate_random_vec(KEY_ID_LEN)
        .map_err(|e| OpError::ck(e, Function::GenerateRandom))?;
    let public_template = [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::EcParams(SECP256K1_EC_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let private_template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Copyable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &public_template,
            &private_template,
        )
        .map_err(|e| OpError::ck(e, Function::GenerateKeyPair))?;
    let key_ref = KeyRef::Pkcs11 {
        label: label.to_owned(),
        id: hex::encode(&id),
    };
    match read_public(session, public, &key_ref) {
        Ok(public_key) => Ok(key_info(key_ref, public_key)),
        Err(e) => {
            // A pair we cannot read back is useless; do not leave it behind.
            let _ = session.destroy_object(private);
            let _ = session.destroy_object(public);
            Err(e)
        }
    }
}

/// The private key object of `key`: exactly one must exist.
pub(super) fn find_private(
    session: &Session,
    key: &KeyRef,
    label: &str,
    id: &[u8],
) -> Result<ObjectHandle, OpError> {
    let found = find(
        session,
        &key_template(ObjectClass::PRIVATE_KEY, label, Some(id)),
    )?;
    match found.as_slice() {
        [handle] => Ok(*handle),
        [] => Err(not_found(session, key.to_string())),
        many => Err(OpError::Fail(BackendError::KeyMismatch {
            key: key.to_string(),
            reason: format!("{} private key objects carry this label and id", many.len()),
        })),
    }
}

/// Reads `key`'s public key, checking that both objects exist and are secp256k1.
pub(super) fn read_key(session: &Session, key: &KeyRef) -> Result<KeyInfo, OpError> {
    let (label, id) = pkcs11_ref(key)?;
    let private = find_private(session, key, label, &id)?;
    let params = get_attribute(session, private, AttributeType::EcParams)?;
    check_params(key, params.as_deref())?;
    let publics = find(
        session,
        &key_template(ObjectClass::PUBLIC_KEY, label, Some(&id)),
    )?;
    let public = match publics.as_slice() {
        [handle] => *handle,
        [] => {
            return Err(OpError::Fail(BackendError::KeyMismatch {
                key: key.to_string(),
                reason: "the public key object is missing".into(),
            }));
        }
        many => {
            return Err(OpError::Fail(BackendError::KeyMismatch {
                key: key.to_string(),
                reason: format!("{} public key objects carry this label and id", many.len()),
            }));
        }
    };
    let public_key = read_public(session, public, key)?;
    Ok(key_info(key.clone(), public_key))
}

/// Finds the one key labelled `label` and reads it.
pub(super) fn find_by_label(session: &Session, label: &str) -> Result<KeyInfo, OpError> {
    check_label(label)?;
    let found = find(
        session,
        &key_template(ObjectClass::PRIVATE_KEY, label, None),
    )?;
    let private = match found.as_slice() {
        [handle] => *handle,
        [] => return Err(not_found(session, format!("no key labelled {label:?}"))),
        many => {
            return Err(OpError::Fail(BackendError::KeyMismatch {
                key: label.to_owned(),
                reason: format!("{} private keys carry this label", many.len()),
            }));
        }
    };
    let id = get_attribute(session, private, AttributeType::Id)?.ok_or_else(|| {
        OpError::Fail(BackendError::KeyMismatch {
            key: label.to_owned(),
            reason: "the private key has no CKA_ID".into(),
        })
    })?;
    read_key(
        session,
        &KeyRef::Pkcs11 {
            label: label.to_owned(),
            id: hex::encode(id),
        },
    )
}

/// Signs a 32-byte digest with `CKM_ECDSA`; returns the device's raw output (`r‖s`).
pub(super) fn sign_digest(
    session: &Session,
    private: ObjectHandle,
    digest: &B256,
) -> Result<Vec<u8>, OpError> {
    session
        .sign(&Mechanism::Ecdsa, private, digest.as_slice())
        .map_err(|e| OpError::ck(e, Function::Sign))
}

/// Destroys `key`'s private and public key objects (private first, so that a failure half-way
/// never leaves a signing key without its public half being known to be gone).
pub(super) fn destroy(session: &Session, key: &KeyRef) -> Result<(), OpError> {
    let (label, id) = pkcs11_ref(key)?;
    let privates = find(
        session,
        &key_template(ObjectClass::PRIVATE_KEY, label, Some(&id)),
    )?;
    let publics = find(
        session,
        &key_template(ObjectClass::PUBLIC_KEY, label, Some(&id)),
    )?;
    if privates.is_empty() && publics.is_empty() {
        return Err(not_found(session, key.to_string()));
    }
    for handle in privates.into_iter().chain(publics) {
        session
            .destroy_object(handle)
            .map_err(|e| OpError::ck(e, Function::DestroyObject))?;
    }
    Ok(())
}

/// Parses `CKA_EC_POINT`: a DER OCTET STRING around the SEC1 point (as PKCS#11 specifies and
/// SoftHSM returns: `04 41 04‖X‖Y`), or the bare SEC1 point (as some modules return).
pub fn parse_ec_point(bytes: &[u8]) -> Result<VerifyingKey, String> {
    let sec1 = match bytes {
        [0x04, len, rest @ ..]
            if usize::from(*len) == rest.len() && matches!(rest.len(), 33 | 65) =>
        {
            rest
        }
        _ => bytes,
    };
    VerifyingKey::from_sec1_bytes(sec1).map_err(|_| {
        format!(
            "CKA_EC_POINT ({} bytes) is not a secp256k1 point",
            bytes.len()
        )
    })
}

fn key_info(key_ref: KeyRef, public_key: VerifyingKey) -> KeyInfo {
    KeyInfo {
        key_ref,
        address: Address::from_public_key(&public_key),
        public_key,
    }
}

fn read_public(
    session: &Session,
    public: ObjectHandle,
    key: &KeyRef,
) -> Result<VerifyingKey, OpError> {
    let attributes = session
        .get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
        .map_err(|e| OpError::ck(e, Function::GetAttributeValue))?;
    let mut params = None;
    let mut point = None;
    for attribute in attributes {
        match attribute {
            Attribute::EcParams(v) => params = Some(v),
            Attribute::EcPoint(v) => point = Some(v),
            _ => {}
        }
    }
    check_params(key, params.as_deref())?;
    let point = point.ok_or_else(|| mismatch(key, "the public key has no CKA_EC_POINT"))?;
    parse_ec_point(&point).map_err(|reason| mismatch(key, &reason))
}

fn check_params(key: &KeyRef, params: Option<&[u8]>) -> Result<(), OpError> {
    match params {
        Some(p) if p == SECP256K1_EC_PARAMS => Ok(()),
        Some(p) => Err(mismatch(
            key,
            &format!("CKA_EC_PARAMS {} is not secp256k1", hex::encode(p)),
        )),
        None => Err(mismatch(key, "no CKA_EC_PARAMS (not an EC key)")),
    }
}

fn mismatch(key: &KeyRef, reason: &str) -> OpError {
    OpError::Fail(BackendError::KeyMismatch {
        key: key.to_string(),
        reason: reason.to_owned(),
    })
}

fn get_attribute(
    session: &Session,
    object: ObjectHandle,
    kind: AttributeType,
) -> Result<Option<Vec<u8>>, OpError> {
    let attributes = session
        .get_attributes(object, &[kind])
        .map_err(|e| OpError::ck(e, Function::GetAttributeValue))?;
    Ok(attributes.into_iter().find_map(|a| match a {
        Attribute::EcParams(v) | Attribute::Id(v) | Attribute::EcPoint(v) => Some(v),
        _ => None,
    }))
}

fn key_template(class: ObjectClass, label: &str, id: Option<&[u8]>) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    if let Some(id) = id {
        template.push(Attribute::Id(id.to_vec()));
    }
    template
}

fn find(session: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, OpError> {
    session
        .find_objects(template)
        .map_err(|e| OpError::ck(e, Function::FindObjects))
}

fn check_label(label: &str) -> Result<(), OpError> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN || label.chars().any(char::is_control) {
        return Err(OpError::Fail(BackendError::KeyNotFound(format!(
            "invalid key label {label:?} (1 to {MAX_LABEL_LEN} bytes, no control characters)"
        ))));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;

    #[test]
    fn ec_point_der_and_raw() {
        let key = SigningKey::random(&mut rand::thread_rng());
        let point = key.verifying_key().to_encoded_point(false);
        let raw = point.as_bytes().to_vec();
        assert_eq!(raw.len(), 65);
        let mut der = vec![0x04, 0x41];
        der.extend_from_slice(&raw);
        assert_eq!(parse_ec_point(&der).unwrap(), *key.verifying_key());
        assert_eq!(parse_ec_point(&raw).unwrap(), *key.verifying_key());
        let compressed = key.verifying_key().to_encoded_point(true);
        let mut der33 = vec![0x04, 0x21];
        der33.extend_from_slice(compressed.as_bytes());
        assert_eq!(parse_ec_point(&der33).unwrap(), *key.verifying_key());
        assert!(parse_ec_point(&der[..66]).is_err());
        assert!(parse_ec_point(&[0x04, 0x41]).is_err());
        let mut off_curve = raw.clone();
        off_curve[64] ^= 1;
        assert!(parse_ec_point(&off_curve).is_err());
    }
}
