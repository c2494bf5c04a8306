//! Principals and their SPIFFE-style identities.
//!
//! Every certificate the consortium CA issues carries exactly one URI SAN naming its principal:
//!
//! | principal | identity |
//! |---|---|
//! | coordinator | `spiffe://<consortium>/coordinator` |
//! | audit service | `spiffe://<consortium>/audit` |
//! | site node | `spiffe://<consortium>/site/<site>/node` |
//! | site user (officer, admin) | `spiffe://<consortium>/site/<site>/user/<name>` |
//! | consortium operator | `spiffe://<consortium>/operator/<name>` |
//!
//! That URI is the identity everywhere: policy, audit, approvals. This module parses and prints it;
//! nothing else in the code base builds or splits identity strings by hand.

use std::fmt;
use std::str::FromStr;

/// What kind of principal a certificate names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Coordinator,
    Audit,
    Node,
    User,
    Operator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Coordinator,
        Role::Audit,
        Role::Node,
        Role::User,
        Role::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Audit => "audit",
            Role::Node => "node",
            Role::User => "user",
            Role::Operator => "operator",
        }
    }

    /// Servers (coordinator, audit service) also connect to each other as clients.
    pub fn is_server(self) -> bool {
        matches!(self, Role::Coordinator | Role::Audit)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_string()))
    }
}

/// The principal inside a consortium.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Coordinator,
    Audit,
    Node { site: String },
    User { site: String, name: String },
    Operator { name: String },
}

impl Principal {
    pub fn role(&self) -> Role {
        match self {
            Principal::Coordinator => Role::Coordinator,
            Principal::Audit => Role::Audit,
            Principal::Node { .. } => Role::Node,
            Principal::User { .. } => Role::User,
            Principal::Operator { .. } => Role::Operator,
        }
    }

    /// The site a node or site user belongs to.
    pub fn site(&self) -> Option<&str> {
        match self {
            Principal::Node { site } | Principal::User { site, .. } => Some(site),
            _ => None,
        }
    }

    /// The personal name of a user or operator.
    pub fn name(&self) -> Option<&str> {
        match self {
            Principal::User { name, .. } | Principal::Operator { name } => Some(name),
            _ => None,
        }
    }

    /// Builds a principal from a role and the site/name parts the role needs, refusing parts the
    /// role does not take (an operator has no site; a coordinator has neither).
    pub fn from_parts(
        role: Role,
        site: Option<&str>,
        name: Option<&str>,
    ) -> Result<Self, IdentityError> {
        let need = |what: &'static str, v: Option<&str>| -> Result<String, IdentityError> {
            let v = v.ok_or(IdentityError::MissingPart { role, part: what })?;
            validate_segment(what, v)?;
            Ok(v.to_string())
        };
        let refuse = |what: &'static str, v: Option<&str>| -> Result<(), IdentityError> {
            match v {
                Some(_) => Err(IdentityError::UnexpectedPart { role, part: what }),
                None => Ok(()),
            }
        };
        Ok(match role {
            Role::Coordinator => {
                refuse("site", site)?;
                refuse("name", name)?;
                Principal::Coordinator
            }
            Role::Audit => {
                refuse("site", site)?;
                refuse("name", name)?;
                Principal::Audit
            }
            Role::Node => {
                refuse("name", name)?;
                Principal::Node {
                    site: need("site", site)?,
                }
            }
            Role::User => Principal::User {
                site: need("site", site)?,
                name: need("name", name)?,
            },
            Role::Operator => {
                refuse("site", site)?;
                Principal::Operator {
                    name: need("name", name)?,
                }
            }
        })
    }
}

/// A verified principal of a consortium: what a handler learns about its caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub consortium: String,
    pub principal: Principal,
}

impl Identity {
    pub fn new(consortium: &str, principal: Principal) -> Result<Self, IdentityError> {
        validate_segment("consortium", consortium)?;
        Ok(Identity {
            consortium: consortium.to_string(),
            principal,
        })
    }

    pub fn role(&self) -> Role {
        self.principal.role()
    }

    /// The `spiffe://` URI, as written in the certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Checks that this identity may act for `site`: it must be that site's node or one of its
    /// users. The error names both identities, for the caller and the log.
    pub fn require_site(&self, site: &str) -> Result<(), IdentityError> {
        match self.principal.site() {
            Some(own) if own == site => Ok(()),
            _ => Err(IdentityError::NotOfSite {
                identity: self.uri(),
                site: site.to_string(),
            }),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/", self.consortium)?;
        match &self.principal {
            Principal::Coordinator => f.write_str("coordinator"),
            Principal::Audit => f.write_str("audit"),
            Principal::Node { site } => write!(f, "site/{site}/node"),
            Principal::User { site, name } => write!(f, "site/{site}/user/{name}"),
            Principal::Operator { name } => write!(f, "operator/{name}"),
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = |why: &'static str| IdentityError::Malformed {
            uri: uri.to_string(),
            why,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("it does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let consortium = parts.next().unwrap_or_default();
        validate_segment("consortium", consortium).map_err(|_| bad("bad consortium name"))?;
        let segs: Vec<&str> = parts.collect();
        for s in &segs {
            validate_segment("segment", s).map_err(|_| bad("bad path segment"))?;
        }
        let principal = match segs.as_slice() {
            ["coordinator"] => Principal::Coordinator,
            ["audit"] => Principal::Audit,
            ["site", site, "node"] => Principal::Node {
                site: site.to_string(),
            },
            ["site", site, "user", name] => Principal::User {
                site: site.to_string(),
                name: name.to_string(),
            },
            ["operator", name] => Principal::Operator {
                name: name.to_string(),
            },
            _ => return Err(bad("the path names no known principal")),
        };
        Ok(Identity {
            consortium: consortium.to_string(),
            principal,
        })
    }
}

/// Consortium, site and personal names become URI path segments and file names: keep them to a
/// conservative alphabet so that no name can smuggle a `/`, a `..`, or a character that reads
/// differently in a log.
pub fn validate_segment(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && !value.starts_with(['.', '-'])
        && value != "..";
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("unknown role {0:?}: expected one of coordinator, audit, node, user, operator")]
    UnknownRole(String),
    #[error("a {role} identity needs a {part}")]
    MissingPart { role: Role, part: &'static str },
    #[error("a {role} identity takes no {part}")]
    UnexpectedPart { role: Role, part: &'static str },
    #[error(
        "invalid {what} {value:?}: use 1-63 characters of a-z, 0-9, '-', '_' and '.', not starting with '.' or '-'"
    )]
    BadName { what: &'static str, value: String },
    #[error("malformed identity {uri:?}: {why}")]
    Malformed { uri: String, why: &'static str },
    #[error("{identity} may not act for site {site:?}")]
    NotOfSite { identity: String, site: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_principal_round_trips() {
        let cases = [
            ("spiffe://acme/coordinator", Principal::Coordinator),
            ("spiffe://acme/audit", Principal::Audit),
            (
                "spiffe://acme/site/st-mary/node",
                Principal::Node {
                    site: "st-mary".into(),
                },
            ),
            (
                "spiffe://acme/site/st-mary/user/alice",
                Principal::User {
                    site: "st-mary".into(),
                    name: "alice".into(),
                },
            ),
            (
                "spiffe://acme/operator/bob",
                Principal::Operator { name: "bob".into() },
            ),
        ];
        for (uri, principal) in cases {
            let id: Identity = uri.parse().unwrap();
            assert_eq!(id.principal, principal);
            assert_eq!(id.consortium, "acme");
            assert_eq!(id.to_string(), uri);
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        for uri in [
            "https://acme/coordinator",
            "spiffe://acme/",
            "spiffe://acme/site/x",
            "spiffe://acme/site/x/node/extra",
            "spiffe://acme/site/../node",
            "spiffe://ACME/coordinator",
            "spiffe:///coordinator",
            "spiffe://acme/site/a b/node",
        ] {
            assert!(uri.parse::<Identity>().is_err(), "{uri} should be refused");
        }
    }

    #[test]
    fn from_parts_checks_what_each_role_needs() {
        assert!(Principal::from_parts(Role::Node, None, None).is_err());
        assert!(Principal::from_parts(Role::Node, Some("a"), Some("n")).is_err());
        assert!(Principal::from_parts(Role::Operator, Some("a"), Some("n")).is_err());
        assert!(Principal::from_parts(Role::Coordinator, None, Some("n")).is_err());
        assert_eq!(
            Principal::from_parts(Role::User, Some("a"), Some("n")).unwrap(),
            Principal::User {
                site: "a".into(),
                name: "n".into()
            }
        );
    }

    #[test]
    fn require_site_accepts_own_site_only() {
        let id: Identity = "spiffe://acme/site/a/node".parse().unwrap();
        assert!(id.require_site("a").is_ok());
        let err = id.require_site("b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "spiffe://acme/site/a/node may not act for site \"b\""
        );
        let op: Identity = "spiffe://acme/operator/o".parse().unwrap();
        assert!(op.require_site("a").is_err());
    }
}
