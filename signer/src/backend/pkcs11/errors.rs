//! Mapping cryptoki errors to [`BackendError`] and deciding which ones mean "reconnect".

use cryptoki::context::Function;
use cryptoki::error::{Error, RvError};

use crate::backend::BackendError;

/// What a failed PKCS#11 call says about the pool's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Loss {
    /// This session is gone (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`): reopen it, and
    /// check the login.
    Session,
    /// The login is gone (`CKR_USER_NOT_LOGGED_IN`): log in again.
    Login,
    /// The device or the library's view of it is gone (`CKR_DEVICE_REMOVED`,
    /// `CKR_TOKEN_NOT_PRESENT`, `CKR_DEVICE_ERROR`, `CKR_CRYPTOKI_NOT_INITIALIZED`, …):
    /// `C_Finalize`, `C_Initialize`, find the token by label again, log in again.
    Device,
}

/// How to react to a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// The pool must recover.
    Lost(Loss),
    /// An object handle is stale (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`): forget
    /// cached handles and look the key up again.
    StaleHandle,
    /// Anything else: report it to the caller.
    Other,
}

/// Classifies a cryptoki error.
pub(super) fn classify(error: &Error) -> Class {
    let Error::Pkcs11(rv, _) = error else {
        return Class::Other;
    };
    match rv {
        RvError::SessionHandleInvalid | RvError::SessionClosed => Class::Lost(Loss::Session),
        RvError::UserNotLoggedIn => Class::Lost(Loss::Login),
        RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized
        | RvError::GeneralError => Class::Lost(Loss::Device),
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Class::StaleHandle,
        _ => Class::Other,
    }
}

/// `BackendError::Pkcs11` naming the function and the return code; `fallback` names the function
/// for errors that do not come from the module (conversions in cryptoki).
pub(super) fn pkcs11_error(error: &Error, fallback: Function) -> BackendError {
    match error {
        Error::Pkcs11(rv, function) => BackendError::Pkcs11 {
            function: function_name(*function),
            rv: rv_name(rv),
        },
        other => BackendError::Pkcs11 {
            function: function_name(fallback),
            rv: other.to_string(),
        },
    }
}

/// The C name of a PKCS#11 function: `Function::Sign` → `C_Sign`.
pub(super) fn function_name(function: Function) -> String {
    format!("C_{function:?}")
}

/// The `CKR_` name of a return code: `RvError::PinIncorrect` → `CKR_PIN_INCORRECT`.
///
/// cryptoki's `Display` for `RvError` is the spec's prose; operators and the issue tracker know
/// the constant names, which the variant names spell in CamelCase.
pub(super) fn rv_name(rv: &RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::with_capacity(camel.len() + 8);
    out.push_str("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c);
        } else if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_uppercase());
        } else {
            // Vendor-defined codes print as `VendorDefined(0x…)`; keep the digits readable.
            out.push(if c == '(' || c == ')' { '_' } else { c });
        }
    }
    out.trim_end_matches('_').to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(rv_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            rv_name(&RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            rv_name(&RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(rv_name(&RvError::UserNotLoggedIn), "CKR_USER_NOT_LOGGED_IN");
        assert_eq!(function_name(Function::Sign), "C_Sign");
        assert_eq!(
            function_name(Function::GetAttributeValue),
            "C_GetAttributeValue"
        );
        let e = pkcs11_error(
            &Error::Pkcs11(RvError::DeviceRemoved, Function::Sign),
            Function::Sign,
        );
        assert_eq!(e.to_string(), "PKCS#11 C_Sign failed: CKR_DEVICE_REMOVED");
    }

    #[test]
    fn classes() {
        let c = |rv| classify(&Error::Pkcs11(rv, Function::Sign));
        assert_eq!(c(RvError::SessionClosed), Class::Lost(Loss::Session));
        assert_eq!(c(RvError::UserNotLoggedIn), Class::Lost(Loss::Login));
        assert_eq!(c(RvError::DeviceRemoved), Class::Lost(Loss::Device));
        assert_eq!(c(RvError::TokenNotPresent), Class::Lost(Loss::Device));
        assert_eq!(c(RvError::ObjectHandleInvalid), Class::StaleHandle);
        assert_eq!(c(RvError::DataLenRange), Class::Other);
        assert_eq!(classify(&Error::NotSupported), Class::Other);
    }
}
