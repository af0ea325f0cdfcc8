//! The mesh ACL: who may *initiate* traffic to whom, by tags, protocol and port.
//!
//! Pure data plus evaluation. The coordinator uses it for peer visibility
//! ([`AclPolicy::may_talk`]: a node learns a peer only if one of them may
//! initiate to the other) and ships each node the subset that concerns its
//! inbound traffic ([`AclPolicy::inbound_filter`]), which the node enforces on
//! receive. Replies to an allowed flow are not the policy's business: the
//! node's connection tracking lets them through.
//!
//! ```toml
//! # Default policy (exactly these two rules):
//! [[rule]]
//! from = "engineer"     # one tag or a list; "*" = any node
//! to = "worker"
//! proto = "tcp"         # tcp | udp | icmp | any   (default: any)
//! ports = [22, 7070]    # numbers or "lo-hi" strings (default: all; not allowed with icmp)
//! ```
//!
//! Invariants: rules are validated at parse time (tags are DNS labels or `*`,
//! port ranges are `1 <= lo <= hi`, `icmp` has no ports); evaluation never
//! fails and is a pure function of (policy, tags, proto, port).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::names::validate_tag;

/// The worker agent's HTTP API port on a worker's overlay addresses.
pub const AGENT_API_PORT: u16 = 7070;
/// SSH.
pub const SSH_PORT: u16 = 22;

pub use crate::names::GROUP_TAG_PREFIX;

/// Whether `tag` is a group tag ([`GROUP_TAG_PREFIX`]).
pub fn is_group_tag(tag: &str) -> bool {
    tag.starts_with(GROUP_TAG_PREFIX)
}

/// Whether `tag` is a gang's group tag (`pool-job-N`; not a cluster's owner or head tag).
pub fn is_gang_tag(tag: &str) -> bool {
    is_group_tag(tag)
        && crate::cluster::owner_of(tag).is_none()
        && crate::cluster::head_of(tag).is_none()
}

/// Whether two tag lists share a gang's group tag.
pub fn share_group(a: &[String], b: &[String]) -> bool {
    a.iter().any(|t| is_gang_tag(t) && b.contains(t))
}

/// Whether `a` owns a Ray cluster whose head is `b` (`pool-job-N-owner` on `a`,
/// `pool-job-N-head` on `b`): `a` may open the head's [`crate::cluster::OWNER_PORTS`].
pub fn owns_head(a: &[String], b: &[String]) -> bool {
    a.iter()
        .filter_map(|t| crate::cluster::owner_of(t))
        .any(|job| {
            b.iter()
                .filter_map(|t| crate::cluster::head_of(t))
                .any(|h| h == job)
        })
}

/// Whether the pool links two nodes: a gang's members, or a cluster's owner and its head.
pub fn pool_linked(a: &[String], b: &[String]) -> bool {
    share_group(a, b) || owns_head(a, b) || owns_head(b, a)
}

/// A transport protocol as the ACL sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6 (no ports).
    Icmp,
    /// Any protocol, any port in the rule's ranges (ports apply to TCP/UDP only).
    Any,
}

impl Proto {
    /// Stable wire code.
    pub fn code(self) -> u8 {
        match self {
            Proto::Tcp => 1,
            Proto::Udp => 2,
            Proto::Icmp => 3,
            Proto::Any => 4,
        }
    }

    /// From a wire code.
    pub fn from_code(c: u8) -> Option<Proto> {
        Some(match c {
            1 => Proto::Tcp,
            2 => Proto::Udp,
            3 => Proto::Icmp,
            4 => Proto::Any,
            _ => return None,
        })
    }

    /// Whether a rule for `self` covers a packet of protocol `p` (a concrete
    /// protocol, not `Any`).
    fn covers(self, p: Proto) -> bool {
        self == Proto::Any || self == p
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Any => "any",
        })
    }
}

/// An inclusive port range, `1 <= lo <= hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// A single port.
    pub const fn one(p: u16) -> PortRange {
        PortRange { lo: p, hi: p }
    }

    /// All ports.
    pub const ALL: PortRange = PortRange { lo: 1, hi: 65535 };

    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    fn parse(s: &str) -> Result<PortRange, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u16>()
                .map_err(|_| format!("bad port {t:?} (expected 1-65535)"))
        };
        let r = match s.split_once('-') {
            Some((a, b)) => PortRange {
                lo: num(a)?,
                hi: num(b)?,
            },
            None => PortRange::one(num(s)?),
        };
        if r.lo == 0 || r.lo > r.hi {
            return Err(format!("bad port range {s:?} (need 1 <= lo <= hi)"));
        }
        Ok(r)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .map(PortRange::one)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("bad port {n} (expected 1-65535)"))
                }),
            Raw::S(s) => PortRange::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// One allow rule: nodes with any `from` tag may initiate `proto` traffic to
/// `ports` on nodes with any `to` tag.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Source tags (any of); `"*"` matches every node.
    #[serde(deserialize_with = "one_or_many")]
    pub from: Vec<String>,
    /// Destination tags (any of); `"*"` matches every node.
    #[serde(deserialize_with = "one_or_many")]
    pub to: Vec<String>,
    /// Protocol. Default `any`.
    #[serde(default = "proto_any")]
    pub proto: Proto,
    /// Destination ports. Default: all. Must be empty for `icmp`.
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

fn proto_any() -> Proto {
    Proto::Any
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

fn tags_match(rule_tags: &[String], node_tags: &[String]) -> bool {
    rule_tags
        .iter()
        .any(|t| t == "*" || node_tags.iter().any(|n| n == t))
}

impl Rule {
    fn ports_cover(&self, proto: Proto, port: u16) -> bool {
        // ICMP carries no ports; a port list restricts TCP/UDP only.
        proto == Proto::Icmp || self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port))
    }
}

/// A policy error: which rule, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// The TOML did not parse (the message names line and column).
    #[error("{origin}: {message}")]
    Parse {
        /// File name or other origin.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A rule is invalid.
    #[error("{origin}: rule {index}: {message}")]
    Rule {
        /// File name or other origin.
        origin: String,
        /// 1-based rule number.
        index: usize,
        /// What is wrong and what to write instead.
        message: String,
    },
}

/// The ACL: a list of allow rules; everything else is denied.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclPolicy {
    /// Allow rules (TOML: `[[rule]]`).
    #[serde(rename = "rule", default)]
    pub rules: Vec<Rule>,
}

impl Default for AclPolicy {
    /// `engineer` → `worker` on tcp/22 and tcp/[`AGENT_API_PORT`]; nothing else.
    fn default() -> Self {
        AclPolicy {
            rules: vec![Rule {
                from: crate::names::tags(&["engineer"]),
                to: crate::names::tags(&["worker"]),
                proto: Proto::Tcp,
                ports: vec![PortRange::one(SSH_PORT), PortRange::one(AGENT_API_PORT)],
            }],
        }
    }
}

/// One rule as a node enforces it on receive: a packet from a peer carrying
/// tag `from` (or any peer if `"*"`) of protocol `proto` to a port in `ports`
/// (empty = all) may start a flow.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InboundRule {
    /// Peer tag, or `"*"`.
    pub from: String,
    /// Protocol.
    pub proto: Proto,
    /// Destination ports; empty means all.
    pub ports: Vec<PortRange>,
}

/// What one node enforces on receive: the rules whose `to` matches its tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilterRules {
    /// Allow rules; a new inbound flow matching none is dropped.
    pub rules: Vec<InboundRule>,
}

impl FilterRules {
    /// Whether a new inbound flow from a peer with `src_tags` is allowed.
    pub fn allows(&self, src_tags: &[String], proto: Proto, dst_port: u16) -> bool {
        self.rules.iter().any(|r| {
            (r.from == "*" || src_tags.contains(&r.from))
                && r.proto.covers(proto)
                && (proto == Proto::Icmp
                    || r.ports.is_empty()
                    || r.ports.iter().any(|p| p.contains(dst_port)))
        })
    }
}

impl AclPolicy {
    /// Parses TOML text (`[[rule]]` tables); `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<AclPolicy, PolicyError> {
        let p: AclPolicy = toml::from_str(text).map_err(|e| PolicyError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        p.validate(origin)?;
        Ok(p)
    }

    /// Checks every rule (also for policies embedded in another config).
    pub fn validate(&self, origin: &str) -> Result<(), PolicyError> {
        for (i, r) in self.rules.iter().enumerate() {
            let err = |message: String| PolicyError::Rule {
                origin: origin.to_string(),
                index: i + 1,
                message,
            };
            if r.from.is_empty() || r.to.is_empty() {
                return Err(err(
                    "`from` and `to` need at least one tag (\"*\" = any node)".into(),
                ));
            }
            for t in r.from.iter().chain(&r.to) {
                if t != "*" {
                    validate_tag(t).map_err(|e| err(format!("tag {t:?}: {e}")))?;
                }
                if is_group_tag(t) {
                    return Err(err(format!(
                        "tag {t:?}: `{GROUP_TAG_PREFIX}…` tags are the pool's own (a running gang's members)"
                    )));
                }
            }
            if r.proto == Proto::Icmp && !r.ports.is_empty() {
                return Err(err("icmp has no ports; remove `ports`".into()));
            }
        }
        Ok(())
    }

    /// Whether a node tagged `src` may start a `proto` flow to `dst_port` on a
    /// node tagged `dst`. `proto` is the packet's protocol (`Any` is treated
    /// as "some protocol": true if any rule from `src` to `dst` exists).
    pub fn packet_allowed(
        &self,
        src: &[String],
        dst: &[String],
        proto: Proto,
        dst_port: u16,
    ) -> bool {
        share_group(src, dst)
            || (owns_head(src, dst)
                && matches!(proto, Proto::Tcp | Proto::Any)
                && (proto == Proto::Any || crate::cluster::OWNER_PORTS.contains(&dst_port)))
            || self.rules.iter().any(|r| {
                tags_match(&r.from, src)
                    && tags_match(&r.to, dst)
                    && (proto == Proto::Any
                        || (r.proto.covers(proto) && r.ports_cover(proto, dst_port)))
            })
    }

    /// Whether a node tagged `a` may initiate anything at all to a node tagged `b`.
    pub fn may_initiate(&self, a: &[String], b: &[String]) -> bool {
        self.rules
            .iter()
            .any(|r| tags_match(&r.from, a) && tags_match(&r.to, b))
    }

    /// Peer visibility: `a` learns `b` (and `b` learns `a`) when either may
    /// initiate to the other; replies must flow, so both need the peer.
    pub fn may_talk(&self, a: &[String], b: &[String]) -> bool {
        pool_linked(a, b) || self.may_initiate(a, b) || self.may_initiate(b, a)
    }

    /// The rules a node tagged `dst` enforces on receive, one per source tag.
    pub fn inbound_filter(&self, dst: &[String]) -> FilterRules {
        let mut rules: Vec<InboundRule> = Vec::new();
        for r in self.rules.iter().filter(|r| tags_match(&r.to, dst)) {
            for from in &r.from {
                let ir = InboundRule {
                    from: from.clone(),
                    proto: r.proto,
                    ports: r.ports.clone(),
                };
                if !rules.contains(&ir) {
                    rules.push(ir);
                }
            }
        }
        // A group's members reach each other on everything; a cluster's owner reaches its
        // head's dashboard and Ray Client.
        for g in dst.iter().filter(|t| is_group_tag(t)) {
            if let Some(job) = crate::cluster::head_of(g) {
                rules.push(InboundRule {
                    from: format!("{GROUP_TAG_PREFIX}{job}-owner"),
                    proto: Proto::Tcp,
                    ports: crate::cluster::OWNER_PORTS
                        .iter()
                        .map(|&p| PortRange::one(p))
                        .collect(),
                });
            } else if crate::cluster::owner_of(g).is_none() {
                rules.push(InboundRule {
                    from: g.clone(),
                    proto: Proto::Any,
                    ports: Vec::new(),
                });
            }
        }
        FilterRules { rules }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::tags as t;
    use proptest::prelude::*;

    #[test]
    fn default_policy_engineer_to_worker_ssh_and_agent() {
        let p = AclPolicy::default();
        let (e, w) = (t(&["engineer"]), t(&["worker"]));
        assert!(p.packet_allowed(&e, &w, Proto::Tcp, 22));
        assert!(p.packet_allowed(&e, &w, Proto::Tcp, AGENT_API_PORT));
        assert!(!p.packet_allowed(&e, &w, Proto::Tcp, 80));
        assert!(!p.packet_allowed(&e, &w, Proto::Udp, 22));
        assert!(!p.packet_allowed(&w, &e, Proto::Tcp, 22));
        assert!(!p.packet_allowed(&w, &w, Proto::Tcp, 22));
        assert!(!p.packet_allowed(&e, &e, Proto::Tcp, 22));
        assert!(p.may_talk(&e, &w) && p.may_talk(&w, &e));
        assert!(!p.may_talk(&w, &w) && !p.may_talk(&e, &e));
        assert!(p.inbound_filter(&e).rules.is_empty());
        let f = p.inbound_filter(&w);
        assert!(f.allows(&e, Proto::Tcp, 22));
        assert!(!f.allows(&w, Proto::Tcp, 22));
        assert!(!f.allows(&e, Proto::Icmp, 0));
    }

    #[test]
    fn nodes_sharing_a_group_tag_reach_each_other_on_everything_and_only_them() {
        let p = AclPolicy::default();
        let (a, b) = (t(&["pool-job-7", "worker"]), t(&["pool-job-7", "worker"]));
        let other = t(&["pool-job-8", "worker"]);
        let plain = t(&["worker"]);
        assert!(p.may_talk(&a, &b));
        assert!(p.packet_allowed(&a, &b, Proto::Tcp, 6379));
        assert!(p.packet_allowed(&b, &a, Proto::Udp, 9999));
        assert!(!p.may_talk(&a, &other) && !p.may_talk(&a, &plain));
        assert!(!p.packet_allowed(&a, &other, Proto::Tcp, 6379));
        let f = p.inbound_filter(&a);
        assert!(f.allows(&b, Proto::Tcp, 6379) && f.allows(&b, Proto::Icmp, 0));
        assert!(!f.allows(&other, Proto::Tcp, 6379));
        assert!(!f.allows(&plain, Proto::Tcp, 6379));
        // Engineers still reach the member as before.
        assert!(f.allows(&t(&["engineer"]), Proto::Tcp, 22));
        let e = AclPolicy::parse(
            "[[rule]]\nfrom = \"pool-job-1\"\nto = \"worker\"\n",
            "acl.toml",
        )
        .expect_err("group tags are the pool's");
        assert!(e.to_string().contains("pool's own"), "{e}");
    }

    #[test]
    fn a_clusters_owner_reaches_its_heads_dashboard_and_client_only() {
        let p = AclPolicy::default();
        let owner = t(&["engineer", "pool-job-7-owner"]);
        let head = t(&["worker", "pool-job-7", "pool-job-7-head"]);
        let member = t(&["worker", "pool-job-7"]);
        let other_head = t(&["worker", "pool-job-8", "pool-job-8-head"]);
        assert!(p.packet_allowed(&owner, &head, Proto::Tcp, 8265));
        assert!(p.packet_allowed(&owner, &head, Proto::Tcp, 10001));
        assert!(!p.packet_allowed(&owner, &head, Proto::Tcp, 6379));
        assert!(!p.packet_allowed(&owner, &head, Proto::Udp, 8265));
        assert!(!p.packet_allowed(&owner, &member, Proto::Tcp, 8265));
        assert!(!p.packet_allowed(&owner, &other_head, Proto::Tcp, 8265));
        // The head does not reach the owner beyond what the policy says (workers → engineers: nothing).
        assert!(!p.packet_allowed(&head, &owner, Proto::Tcp, 22));
        assert!(p.packet_allowed(&member, &head, Proto::Tcp, 6379));
        let f = p.inbound_filter(&head);
        assert!(f.allows(&owner, Proto::Tcp, 8265));
        assert!(!f.allows(&owner, Proto::Tcp, 6379));
        assert!(f.allows(&member, Proto::Tcp, 6379));
        assert!(!f.allows(&t(&["engineer"]), Proto::Tcp, 8265));
        // A worker outside the cluster: not even visible.
        assert!(!p.may_talk(&t(&["worker"]), &head));
        assert!(p.may_talk(&t(&["worker", "x"]), &t(&["engineer"])));
    }

    #[test]
    fn parses_toml_with_one_or_many_tags_and_ranges() {
        let p = AclPolicy::parse(
            r#"
            [[rule]]
            from = "engineer"
            to = ["worker", "gpu"]
            proto = "tcp"
            ports = [22, "8000-8100"]

            [[rule]]
            from = "*"
            to = "monitor"
            proto = "icmp"
            "#,
            "acl.toml",
        );
        let p = match p {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].ports[1], PortRange { lo: 8000, hi: 8100 });
        assert!(p.packet_allowed(&t(&["engineer"]), &t(&["gpu"]), Proto::Tcp, 8050));
        assert!(!p.packet_allowed(&t(&["engineer"]), &t(&["gpu"]), Proto::Tcp, 8101));
        assert!(p.packet_allowed(&t(&["x"]), &t(&["monitor"]), Proto::Icmp, 0));
        assert!(!p.packet_allowed(&t(&["x"]), &t(&["monitor"]), Proto::Udp, 53));
        assert_eq!(p.rules[1].proto, Proto::Icmp);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                "[[rule]]\nfrom = \"a\"\nto = \"b\"\nport = [1]\n",
                "unknown field",
            ),
            (
                "[[rule]]\nfrom = \"a\"\nto = \"b\"\nports = [0]\n",
                "bad port",
            ),
            (
                "[[rule]]\nfrom = \"a\"\nto = \"b\"\nports = [\"9-3\"]\n",
                "lo <= hi",
            ),
            (
                "[[rule]]\nfrom = \"a\"\nto = \"b\"\nports = [70000]\n",
                "bad port",
            ),
            (
                "[[rule]]\nfrom = \"a\"\nto = \"b\"\nproto = \"sctp\"\n",
                "unknown variant",
            ),
            (
                "[[rule]]\nfrom = \"a\"\nto = \"b\"\nproto = \"icmp\"\nports = [1]\n",
                "icmp has no ports",
            ),
            ("[[rule]]\nfrom = \"Bad Tag\"\nto = \"b\"\n", "rule 1: tag"),
            ("[[rule]]\nfrom = []\nto = \"b\"\n", "at least one tag"),
            ("[[rule]]\nto = \"b\"\n", "missing field `from`"),
            ("[rules]\n", "unknown field"),
        ];
        for (text, want) in cases {
            match AclPolicy::parse(text, "acl.toml") {
                Ok(p) => panic!("{text:?} parsed: {p:?}"),
                Err(e) => {
                    let s = e.to_string();
                    assert!(
                        s.contains(want) && s.starts_with("acl.toml"),
                        "{text:?}: {s}"
                    );
                }
            }
        }
        assert_eq!(AclPolicy::parse("", "x").map(|p| p.rules.len()), Ok(0));
    }

    fn tagset() -> impl Strategy<Value = Vec<String>> {
        // Plain tags, a gang's group tag, and a cluster's owner and head tags.
        prop::collection::vec(
            prop::sample::select(vec![
                "a",
                "b",
                "c",
                "d",
                "pool-job-1",
                "pool-job-1-owner",
                "pool-job-1-head",
                "pool-job-2-head",
            ]),
            0..4,
        )
        .prop_map(|v| v.into_iter().map(String::from).collect())
    }

    fn rule() -> impl Strategy<Value = Rule> {
        let tags = prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "*"]), 1..3)
            .prop_map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
        let proto = prop::sample::select(vec![Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Any]);
        let ports = prop::collection::vec((1u16..100, 0u16..20), 0..3).prop_map(|v| {
            v.into_iter()
                .map(|(lo, n)| PortRange { lo, hi: lo + n })
                .collect()
        });
        (tags.clone(), tags, proto, ports).prop_map(|(from, to, proto, ports)| Rule {
            from,
            to,
            proto,
            ports: if proto == Proto::Icmp { vec![] } else { ports },
        })
    }

    proptest! {
        /// The filter shipped to a node decides exactly like the policy.
        #[test]
        fn inbound_filter_agrees_with_policy(
            rules in prop::collection::vec(rule(), 0..4),
            src in tagset(), dst in tagset(),
            proto in prop::sample::select(vec![Proto::Tcp, Proto::Udp, Proto::Icmp]),
            port in prop_oneof![1u16..130, Just(8265u16), Just(10001u16)],
        ) {
            let p = AclPolicy { rules };
            prop_assert_eq!(
                p.packet_allowed(&src, &dst, proto, port),
                p.inbound_filter(&dst).allows(&src, proto, port)
            );
            // Any allowed packet implies visibility both ways.
            if p.packet_allowed(&src, &dst, proto, port) {
                prop_assert!(p.may_talk(&src, &dst) && p.may_talk(&dst, &src));
            }
        }
    }
}
