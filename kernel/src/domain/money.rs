//! Money: a decimal amount with an ISO 4217 currency. Never a float.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::DomainError;

/// Active ISO 4217 codes with their minor units (digits after the decimal point).
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHF", 2),
    ("CLF", 4),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYI", 0),
    ("UYU", 2),
    ("UYW", 4),
    ("UZS", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XCG", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
];

/// An ISO 4217 currency code such as `EUR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: [u8; 3],
    minor_units: u32,
}

impl Currency {
    /// Accepts an active ISO 4217 code, in upper case.
    pub fn parse(code: &str) -> Result<Self, DomainError> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|(known, minor_units)| {
                let bytes = known.as_bytes();
                Currency {
                    code: [bytes[0], bytes[1], bytes[2]],
                    minor_units: *minor_units,
                }
            })
            .ok_or_else(|| {
                DomainError::invalid("currency", format!("{code:?} is not an ISO 4217 code"))
            })
    }

    pub fn code(&self) -> &str {
        // Only ever built from the ASCII table above.
        std::str::from_utf8(&self.code).unwrap_or("???")
    }

    /// Digits after the decimal point (2 for EUR, 0 for JPY, 3 for KWD).
    pub fn minor_units(&self) -> u32 {
        self.minor_units
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = DomainError;

    fn from_str(code: &str) -> Result<Self, DomainError> {
        Currency::parse(code)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// An amount of one currency. Amounts are never negative here: prices, line
/// totals and order totals. The amount is stored exactly as a decimal string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// A non-negative amount with no more decimals than the currency has
    /// minor units (19.99 EUR, not 19.999 EUR). Trailing zeros are dropped.
    pub fn new(amount: Decimal, currency: Currency) -> Result<Self, DomainError> {
        if amount.is_sign_negative() && !amount.is_zero() {
            return Err(DomainError::invalid("amount", "must not be negative"));
        }
        let amount = amount.normalize();
        if amount.scale() > currency.minor_units() {
            return Err(DomainError::invalid(
                "amount",
                format!(
                    "{currency} has {} decimal places, {amount} has {}",
                    currency.minor_units(),
                    amount.scale()
                ),
            ));
        }
        Ok(Money { amount, currency })
    }

    /// Zero of `currency`.
    pub fn zero(currency: Currency) -> Self {
        Money {
            amount: Decimal::ZERO,
            currency,
        }
    }

    pub fn amount(&self) -> Decimal {
        self.amount
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The sum of two amounts of the same currency.
    pub fn checked_add(&self, other: &Money) -> Result<Money, DomainError> {
        if self.currency != other.currency {
            return Err(DomainError::CurrencyMismatch {
                expected: self.currency,
                found: other.currency,
            });
        }
        let amount = self
            .amount
            .checked_add(other.amount)
            .ok_or_else(|| DomainError::invalid("amount", "total is too large"))?;
        Ok(Money {
            amount: amount.normalize(),
            currency: self.currency,
        })
    }

    /// This amount times a quantity (a line total).
    pub fn times(&self, quantity: u32) -> Result<Money, DomainError> {
        let amount = self
            .amount
            .checked_mul(Decimal::from(quantity))
            .ok_or_else(|| DomainError::invalid("quantity", "line total is too large"))?;
        Ok(Money {
            amount: amount.normalize(),
            currency: self.currency,
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(amount: &str) -> Money {
        Money::new(
            amount.parse().expect("decimal"),
            Currency::parse("EUR").expect("EUR"),
        )
        .expect("valid amount")
    }

    #[test]
    fn currencies_are_iso_4217_codes() {
        assert_eq!(Currency::parse("JPY").map(|c| c.minor_units()), Ok(0));
        assert_eq!(Currency::parse("KWD").map(|c| c.minor_units()), Ok(3));
        for bad in ["eur", "EURO", "XYZ", "", "E€"] {
            assert!(Currency::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn amounts_respect_the_currency_and_sign() {
        let jpy = Currency::parse("JPY").expect("JPY");
        assert!(Money::new("100".parse().expect("decimal"), jpy).is_ok());
        assert!(Money::new("100.5".parse().expect("decimal"), jpy).is_err());
        // Trailing zeros are not extra precision.
        assert_eq!(eur("19.990").amount().to_string(), "19.99");
        let negative = Money::new("-1".parse().expect("decimal"), jpy);
        assert!(matches!(
            negative,
            Err(DomainError::Invalid {
                field: "amount",
                ..
            })
        ));
    }

    #[test]
    fn arithmetic_is_exact_and_checks_currency() {
        // 0.1 + 0.2 is exactly 0.3 in decimal, unlike binary floating point.
        assert_eq!(eur("0.10").checked_add(&eur("0.20")), Ok(eur("0.30")));
        assert_eq!(eur("19.99").times(3), Ok(eur("59.97")));
        let usd = Money::zero(Currency::parse("USD").expect("USD"));
        assert!(matches!(
            eur("1").checked_add(&usd),
            Err(DomainError::CurrencyMismatch { .. })
        ));
    }

    #[test]
    fn money_round_trips_through_json_as_strings() {
        let json = serde_json::to_value(eur("19.99")).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"amount": "19.99", "currency": "EUR"})
        );
        let back: Money = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, eur("19.99"));
        let bad = serde_json::json!({"amount": "1", "currency": "XXX"});
        assert!(serde_json::from_value::<Money>(bad).is_err());
    }
}
