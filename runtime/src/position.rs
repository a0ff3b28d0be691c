//! The one pattern for positions in an ordered log: two numbers written `FIRST<sep>SECOND`,
//! ordered as the pair, parsed back from what they print. The journal's positions and Redis
//! stream entry ids are both made by [`log_position!`].

/// Declares a position type: `pub struct Name { pub first: u64, pub second: u64 }` with
/// ordering, `Display` as `first<sep>second` and `FromStr` back. With `second_may_be_absent`,
/// a lone `first` parses with `second` 0 (Redis accepts stream ids so).
#[macro_export]
macro_rules! log_position {
    (
        $(#[$meta:meta])*
        $name:ident { $first:ident, $second:ident },
        separator: $sep:literal,
        what: $what:literal,
        second_may_be_absent: $optional:literal
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name {
            pub $first: u64,
            pub $second: u64,
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}{}{}", self.$first, $sep, self.$second)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let (first, second) = match s.split_once($sep) {
                    Some(parts) => parts,
                    None if $optional => (s, "0"),
                    None => {
                        return Err(format!(
                            "{} `{s}`: expected two numbers joined by `{}`",
                            $what, $sep
                        ));
                    }
                };
                let number = |v: &str| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{} `{s}`: `{v}` is not a number", $what))
                };
                Ok(Self {
                    $first: number(first)?,
                    $second: number(second)?,
                })
            }
        }
    };
}

#[cfg(test)]
#[allow(
    unreachable_pub,
    reason = "the macro makes public types; these two stay in the tests"
)]
mod tests {
    log_position! {
        Strict { a, b },
        separator: ':',
        what: "strict",
        second_may_be_absent: false
    }
    log_position! {
        Lenient { a, b },
        separator: '-',
        what: "lenient",
        second_may_be_absent: true
    }

    #[test]
    fn positions_print_parse_back_and_order_as_pairs() {
        let p: Strict = "3:70".parse().unwrap();
        assert_eq!(p, Strict { a: 3, b: 70 });
        assert_eq!(p.to_string(), "3:70");
        assert!(Strict { a: 3, b: 70 } < Strict { a: 4, b: 0 });
        assert!("9-10".parse::<Lenient>().unwrap() > "9-9".parse::<Lenient>().unwrap());
    }

    #[test]
    fn a_missing_second_number_is_zero_only_where_allowed() {
        assert_eq!("12".parse::<Lenient>(), Ok(Lenient { a: 12, b: 0 }));
        let err = "12".parse::<Strict>().unwrap_err();
        assert!(err.contains("strict `12`"), "{err}");
        let err = "1:x".parse::<Strict>().unwrap_err();
        assert!(err.contains("`x` is not a number"), "{err}");
    }
}
