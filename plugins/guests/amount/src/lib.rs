//! Money as the plugin contract writes it: an amount is a decimal string
//! ("19.99", "300"), never a float, next to an ISO 4217 code ("EUR").
//! `no_std`, so any guest can use it.
#![no_std]

/// Whether `amount` is a non-negative decimal: digits, optionally a point
/// and more digits ("0", "19.99"; not "", ".5", "1e3", "-1" or "1,50").
pub fn is_decimal(amount: &str) -> bool {
    let (whole, fraction) = match amount.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (amount, None),
    };
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && fraction.is_none_or(digits)
}

/// Whether `code` looks like an ISO 4217 currency code: three capital letters.
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}
