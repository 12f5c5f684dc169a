//! Kubernetes resource quantities (`500m`, `1.5`, `128Mi`, `1e3`), parsed
//! exactly and converted with Kubernetes' rounding (always up).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "invalid quantity {0:?}: expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, e3, ...)"
    )]
    Syntax(String),
    #[error("invalid quantity {0:?}: must not be negative")]
    Negative(String),
    #[error("invalid quantity {0:?}: too large")]
    TooLarge(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// 10^exp
    Decimal(i32),
    /// 2^(10·k): Ki = 1, Mi = 2, ...
    Binary(u32),
}

/// A parsed, non-negative quantity. `mantissa / 10^fraction_digits * scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    text: String,
    mantissa: u128,
    fraction_digits: u32,
    scale: Scale,
}

const MAX_DIGITS: usize = 30;

impl Quantity {
    /// Parses a quantity as Kubernetes' `resource.ParseQuantity` does, except
    /// that negative values are refused: no resource Berth reads may be negative.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let syntax = || QuantityError::Syntax(text.to_string());
        let s = text.trim();
        if s.is_empty() || s != text {
            return Err(syntax());
        }
        let (negative, s) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let number_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(number_end);
        let (int_part, frac_part) = match number.split_once('.') {
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
            return Err(syntax());
        }
        let digits = format!("{int_part}{frac_part}");
        let significant = digits.trim_start_matches('0');
        if significant.len() > MAX_DIGITS {
            return Err(QuantityError::TooLarge(text.to_string()));
        }
        let mantissa: u128 = if significant.is_empty() {
            0
        } else {
            significant.parse().map_err(|_| syntax())?
        };
        let scale = match suffix {
            "" => Scale::Decimal(0),
            "n" => Scale::Decimal(-9),
            "u" => Scale::Decimal(-6),
            "m" => Scale::Decimal(-3),
            "k" => Scale::Decimal(3),
            "M" => Scale::Decimal(6),
            "G" => Scale::Decimal(9),
            "T" => Scale::Decimal(12),
            "P" => Scale::Decimal(15),
            "E" => Scale::Decimal(18),
            "Ki" => Scale::Binary(1),
            "Mi" => Scale::Binary(2),
            "Gi" => Scale::Binary(3),
            "Ti" => Scale::Binary(4),
            "Pi" => Scale::Binary(5),
            "Ei" => Scale::Binary(6),
            other => {
                let exp = other.strip_prefix(['e', 'E']).ok_or_else(syntax)?;
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                let exp: i32 = exp
                    .parse()
                    .map_err(|_| QuantityError::TooLarge(text.to_string()))?;
                if !(-40..=40).contains(&exp) {
                    return Err(QuantityError::TooLarge(text.to_string()));
                }
                Scale::Decimal(exp)
            }
        };
        if negative && mantissa != 0 {
            return Err(QuantityError::Negative(text.to_string()));
        }
        Ok(Self {
            text: text.to_string(),
            mantissa,
            fraction_digits: frac_part.len() as u32,
            scale,
        })
    }

    /// `value · 10^shift`, rounded up to an integer, as Kubernetes' `ScaledValue`.
    fn scaled_ceil(&self, shift: i32) -> Option<u64> {
        if self.mantissa == 0 {
            return Some(0);
        }
        let (mut num, mut den): (u128, u128) = (self.mantissa, 1);
        let mut pow10 = shift - self.fraction_digits as i32;
        match self.scale {
            Scale::Decimal(e) => pow10 += e,
            Scale::Binary(k) => num = num.checked_mul(1u128 << (10 * k))?,
        }
        if pow10 >= 0 {
            num = num.checked_mul(10u128.checked_pow(pow10 as u32)?)?;
        } else {
            let p = (-pow10) as u32;
            if p > 38 {
                return Some(1);
            }
            den = 10u128.pow(p);
        }
        let value = num.div_ceil(den);
        u64::try_from(value).ok().filter(|v| *v <= i64::MAX as u64)
    }

    /// Thousandths (CPU millicores), rounded up like `MilliValue()`.
    pub fn milli(&self) -> Result<u64, QuantityError> {
        self.scaled_ceil(3)
            .ok_or_else(|| QuantityError::TooLarge(self.to_string()))
    }

    /// Whole units (bytes for memory), rounded up like `Value()`.
    pub fn units(&self) -> Result<u64, QuantityError> {
        self.scaled_ceil(0)
            .ok_or_else(|| QuantityError::TooLarge(self.to_string()))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `1536` → `1536m`... for CPU in millicores, the way Kubernetes prints them.
pub fn format_cpu_milli(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

/// Bytes in the largest binary unit that divides them exactly.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"];
    for (i, unit) in UNITS.iter().enumerate() {
        let size = 1u64 << (10 * (6 - i));
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        text: &'static str,
        milli: u64,
        units: u64,
    }

    #[test]
    fn quantities_convert_with_kubernetes_rounding() {
        let cases = [
            Case {
                text: "500m",
                milli: 500,
                units: 1,
            },
            Case {
                text: "1",
                milli: 1000,
                units: 1,
            },
            Case {
                text: "1.5",
                milli: 1500,
                units: 2,
            },
            Case {
                text: ".5",
                milli: 500,
                units: 1,
            },
            Case {
                text: "2.",
                milli: 2000,
                units: 2,
            },
            Case {
                text: "0.1m",
                milli: 1,
                units: 1,
            },
            Case {
                text: "100n",
                milli: 1,
                units: 1,
            },
            Case {
                text: "0",
                milli: 0,
                units: 0,
            },
            Case {
                text: "128Mi",
                milli: 128 * 1024 * 1024 * 1000,
                units: 128 * 1024 * 1024,
            },
            Case {
                text: "1Gi",
                milli: (1u64 << 30) * 1000,
                units: 1 << 30,
            },
            Case {
                text: "1.5Gi",
                milli: 1_610_612_736_000,
                units: 1_610_612_736,
            },
            Case {
                text: "1k",
                milli: 1_000_000,
                units: 1000,
            },
            Case {
                text: "1M",
                milli: 1_000_000_000,
                units: 1_000_000,
            },
            Case {
                text: "1e3",
                milli: 1_000_000,
                units: 1000,
            },
            Case {
                text: "1E-3",
                milli: 1,
                units: 1,
            },
            Case {
                text: "+2",
                milli: 2000,
                units: 2,
            },
            Case {
                text: "-0",
                milli: 0,
                units: 0,
            },
        ];
        for case in cases {
            let q = Quantity::parse(case.text).unwrap_or_else(|e| panic!("{}: {e}", case.text));
            assert_eq!(q.units().ok(), Some(case.units), "units of {}", case.text);
            assert_eq!(q.milli().ok(), Some(case.milli), "milli of {}", case.text);
        }
    }

    #[test]
    fn malformed_and_negative_quantities_are_refused() {
        for bad in [
            "1.5.5", "", " 1", "1 ", "abc", "1Zi", "1e", "1e+", "Mi", ".", "1..2", "1mm", "0x10",
            "1e999",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            Quantity::parse("-1Gi"),
            Err(QuantityError::Negative("-1Gi".into()))
        );
        assert!(matches!(
            Quantity::parse("99999999999999999999999999999999"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(Quantity::parse("100Ei").expect("parses").units().is_err());
    }

    #[test]
    fn quantities_print_as_written() {
        for text in ["500m", "1.5Gi", "0.25", "128Mi", "1e3"] {
            assert_eq!(Quantity::parse(text).expect("parses").to_string(), text);
        }
        assert_eq!(format_bytes(256 << 20), "256Mi");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_cpu_milli(1500), "1500m");
        assert_eq!(format_cpu_milli(2000), "2");
    }
}
