//! `--name value` flags, as the other pclive binaries take them (no argument-parsing crate).

use std::collections::HashMap;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("unknown option '{0}' (see --help)")]
    Unknown(String),
    #[error("option --{0} needs a value")]
    MissingValue(String),
    #[error("option --{0} given twice")]
    Repeated(String),
    #[error("option --{0} is required (see --help)")]
    Required(String),
    #[error("invalid value '{value}' for --{name}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
}

#[derive(Debug)]
pub struct Flags {
    values: HashMap<String, String>,
}

impl Flags {
    /// Parses `--name value` and `--name=value`; only names in `known` are accepted.
    pub fn parse(args: &[String], known: &[&str]) -> Result<Flags, UsageError> {
        let mut values = HashMap::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(UsageError::Unknown(arg.clone()));
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None => {
                    let value = iter
                        .next()
                        .ok_or_else(|| UsageError::MissingValue(flag.to_string()))?;
                    (flag.to_string(), value.clone())
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(UsageError::Unknown(arg.clone()));
            }
            if values.insert(name.clone(), value).is_some() {
                return Err(UsageError::Repeated(name));
            }
        }
        Ok(Flags { values })
    }

    pub fn required<T: FromStr>(&self, name: &str) -> Result<T, UsageError>
    where
        T::Err: std::fmt::Display,
    {
        self.optional(name)?
            .ok_or_else(|| UsageError::Required(name.to_string()))
    }

    pub fn optional<T: FromStr>(&self, name: &str) -> Result<Option<T>, UsageError>
    where
        T::Err: std::fmt::Display,
    {
        self.values
            .get(name)
            .map(|value| {
                value.parse().map_err(|e: T::Err| UsageError::Invalid {
                    name: name.to_string(),
                    value: value.clone(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    pub fn or<T: FromStr>(&self, name: &str, default: T) -> Result<T, UsageError>
    where
        T::Err: std::fmt::Display,
    {
        Ok(self.optional(name)?.unwrap_or(default))
    }
}

pub fn invalid(name: &str, value: impl ToString, reason: &str) -> UsageError {
    UsageError::Invalid {
        name: name.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_both_spellings_and_checks_names() {
        let flags = Flags::parse(
            &args(&["--records", "10", "--seed=3"]),
            &["records", "seed", "x"],
        )
        .unwrap();
        assert_eq!(flags.required::<u64>("records"), Ok(10));
        assert_eq!(flags.required::<u64>("seed"), Ok(3));
        assert_eq!(flags.or::<u64>("x", 7), Ok(7));
        assert_eq!(
            flags.required::<u64>("x"),
            Err(UsageError::Required("x".into()))
        );
        assert!(matches!(
            Flags::parse(&args(&["--records", "ten"]), &["records"])
                .unwrap()
                .required::<u64>("records"),
            Err(UsageError::Invalid { .. })
        ));
        assert_eq!(
            Flags::parse(&args(&["--nope", "1"]), &["records"]).unwrap_err(),
            UsageError::Unknown("--nope".into())
        );
        assert_eq!(
            Flags::parse(&args(&["--records"]), &["records"]).unwrap_err(),
            UsageError::MissingValue("records".into())
        );
        assert_eq!(
            Flags::parse(&args(&["--records", "1", "--records", "2"]), &["records"]).unwrap_err(),
            UsageError::Repeated("records".into())
        );
    }
}
