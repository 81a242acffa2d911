//! Narrowing of C constants into the fields they fill.
//!
//! bindgen types libnftnl's attribute ids as `u32` while its getters and setters take `u16`, and
//! libc types netlink constants as `c_int` while the wire fields are `u16`/`u8`. These helpers
//! assert the value fits (at compile time where used in a `const`), so no cast silently
//! truncates.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "every narrowing here is asserted to fit first"
)]

/// A libnftnl attribute id (`NFTNL_*`) as the `u16` its accessors take.
pub(crate) const fn attr(id: u32) -> u16 {
    assert!(id <= u16::MAX as u32);
    id as u16
}

/// A non-negative C constant as a `u16` wire field.
pub(crate) const fn c16(value: libc::c_int) -> u16 {
    assert!(value >= 0 && value <= u16::MAX as libc::c_int);
    value as u16
}

/// A non-negative C constant as a `u8` wire field.
pub(crate) const fn c8(value: libc::c_int) -> u8 {
    assert!(value >= 0 && value <= u8::MAX as libc::c_int);
    value as u8
}

/// A non-negative C constant as a `u32` attribute value.
pub(crate) const fn c32(value: libc::c_int) -> u32 {
    assert!(value >= 0);
    value as u32
}
