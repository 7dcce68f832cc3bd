//! Host names and allow patterns. A name is normalised once (lower case, no trailing dot,
//! checked syntax) so that `Example.COM.` cannot slip past a rule for `example.com`, and so
//! that names a resolver would treat specially (empty labels, spaces, non-ASCII) are refused.

use std::fmt;

/// A checked, normalised host name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(String);

impl HostName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host {0:?} is empty")]
    Empty(String),
    #[error("host {0:?} is longer than 253 characters")]
    TooLong(String),
    #[error("host {0:?} has an empty or over-long (> 63) label")]
    BadLabel(String),
    #[error(
        "host {0:?} has a character that is not a letter, digit, '-' or '_' (IDNs must be sent as xn-- punycode)"
    )]
    BadCharacter(String),
}

/// Normalises a host name as received (SNI, Host header, CONNECT target without the port).
pub fn normalize(raw: &str) -> Result<HostName, HostError> {
    let h = raw.strip_suffix('.').unwrap_or(raw);
    if h.is_empty() {
        return Err(HostError::Empty(raw.to_owned()));
    }
    if h.len() > 253 {
        return Err(HostError::TooLong(raw.to_owned()));
    }
    if !h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(HostError::BadCharacter(raw.to_owned()));
    }
    if h.split('.').any(|l| l.is_empty() || l.len() > 63) {
        return Err(HostError::BadLabel(raw.to_owned()));
    }
    Ok(HostName(h.to_ascii_lowercase()))
}

/// An allow rule's host part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this name.
    Exact(HostName),
    /// `*.example.com`: any name strictly below `example.com` (not `example.com` itself).
    Subdomains(HostName),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, HostError> {
        match s.strip_prefix("*.") {
            Some(rest) => Ok(Self::Subdomains(normalize(rest)?)),
            None => Ok(Self::Exact(normalize(s)?)),
        }
    }

    pub fn matches(&self, host: &HostName) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Subdomains(parent) => host
                .as_str()
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostName {
        normalize(s).unwrap()
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(host("Example.COM."), host("example.com"));
        assert_eq!(host("api.github.com").as_str(), "api.github.com");
    }

    #[test]
    fn bad_names_are_refused_naming_the_value() {
        assert_eq!(normalize(""), Err(HostError::Empty(String::new())));
        assert!(matches!(normalize("a..b"), Err(HostError::BadLabel(_))));
        assert!(matches!(normalize("exa mple.com"), Err(HostError::BadCharacter(_))));
        assert!(matches!(normalize("bücher.de"), Err(HostError::BadCharacter(_))));
        assert!(matches!(normalize("evil.com\0.good.com"), Err(HostError::BadCharacter(_))));
        assert!(matches!(normalize(&"a".repeat(64)), Err(HostError::BadLabel(_))));
        assert!(normalize("a").is_ok());
        let e = normalize("exa mple.com").unwrap_err().to_string();
        assert!(e.contains("\"exa mple.com\""), "{e}");
    }

    #[test]
    fn patterns() {
        let exact = HostPattern::parse("api.example.com").unwrap();
        assert!(exact.matches(&host("API.example.com.")));
        assert!(!exact.matches(&host("x.api.example.com")));
        let sub = HostPattern::parse("*.example.com").unwrap();
        assert!(sub.matches(&host("a.example.com")));
        assert!(sub.matches(&host("a.b.example.com")));
        assert!(!sub.matches(&host("example.com")), "the parent itself is not a subdomain");
        assert!(!sub.matches(&host("badexample.com")), "suffix on a label boundary only");
        assert!(!sub.matches(&host("example.com.evil.net")));
    }
}
