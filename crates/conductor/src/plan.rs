//! Batch plans and failure budgets: how many hosts a rollout takes at a time, and how many
//! may fail before it stops.
//!
//! A plan is a list of batch sizes, each a count (`3`) or a percentage of the stage's hosts
//! (`"10%"`, rounded down, at least 1); the last size repeats until every host is in a batch
//! (Ansible's `serial` list, which operators know). `[1, "10%", "50%", "100%"]` over 100 hosts
//! gives batches of 1, 10, 50 and the remaining 39; `serial = 2` is the plan `[2]`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

impl BatchSize {
    fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Count(n) => n as usize,
            BatchSize::Percent(p) => (total * p as usize / 100).max(1),
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Count(n) => write!(f, "{n}"),
            BatchSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let parsed = match s.strip_suffix('%') {
            Some(p) => p.trim().parse().map(BatchSize::Percent),
            None => s.parse().map(BatchSize::Count),
        };
        let size = parsed
            .map_err(|_| format!("{s:?} is not a count like 3 or a percentage like \"10%\""))?;
        match size {
            BatchSize::Count(0) | BatchSize::Percent(0) => {
                Err("a batch size must be at least 1".into())
            }
            BatchSize::Percent(p) if p > 100 => Err(format!("{p}% is more than 100%")),
            ok => Ok(ok),
        }
    }
}

impl Serialize for BatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSize::Count(n) => s.serialize_u32(*n),
            BatchSize::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => format!("{n}").parse().map_err(serde::de::Error::custom),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Batch sizes in order; the last one repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlan(pub Vec<BatchSize>);

impl Default for BatchPlan {
    /// One host first, then a quarter of the fleet at a time.
    fn default() -> Self {
        BatchPlan(vec![BatchSize::Count(1), BatchSize::Percent(25)])
    }
}

impl BatchPlan {
    pub fn serial(n: u32) -> Self {
        BatchPlan(vec![BatchSize::Count(n)])
    }

    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("a plan needs at least one batch size".into());
        }
        Ok(())
    }

    /// The sizes of the batches for `total` hosts; they add up to `total`.
    pub fn sizes(&self, total: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut left = total;
        let mut i = 0;
        while left > 0 {
            let size = self.0[i.min(self.0.len().saturating_sub(1))]
                .of(total)
                .clamp(1, left);
            out.push(size);
            left -= size;
            i += 1;
        }
        out
    }

    /// The batch number of each of `total` hosts, in order.
    pub fn assign(&self, total: usize) -> Vec<usize> {
        self.sizes(total)
            .iter()
            .enumerate()
            .flat_map(|(b, &n)| std::iter::repeat_n(b, n))
            .collect()
    }
}

impl fmt::Display for BatchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

impl std::str::FromStr for BatchPlan {
    type Err = String;
    /// `1,10%,50%,100%`
    fn from_str(s: &str) -> Result<Self, String> {
        let sizes = s
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<BatchSize>, _>>()?;
        let plan = BatchPlan(sizes);
        plan.check()?;
        Ok(plan)
    }
}

impl Serialize for BatchPlan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for BatchPlan {
    /// A list of sizes, or one count meaning `serial`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(BatchSize),
            Many(Vec<BatchSize>),
        }
        let plan = match Raw::deserialize(d)? {
            Raw::One(size) => BatchPlan(vec![size]),
            Raw::Many(sizes) => BatchPlan(sizes),
        };
        plan.check().map_err(serde::de::Error::custom)?;
        Ok(plan)
    }
}

/// How many hosts may fail over a whole rollout before it stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Count(u32),
    Percent(u32),
}

impl Budget {
    pub fn check(&self) -> Result<(), String> {
        match self {
            Budget::Percent(p) if *p > 100 => Err(format!("{p}% is more than 100%")),
            _ => Ok(()),
        }
    }

    /// Failures allowed among `total` hosts (percentages round down).
    pub fn allowed(&self, total: usize) -> usize {
        match self {
            Budget::Count(n) => *n as usize,
            Budget::Percent(p) => total * *p as usize / 100,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let b = match s.strip_suffix('%') {
            Some(p) => p.trim().parse().map(Budget::Percent),
            None => s.parse().map(Budget::Count),
        }
        .map_err(|_| format!("{s:?} is not a count like 2 or a percentage like \"10%\""))?;
        b.check()?;
        Ok(b)
    }
}

impl Serialize for Budget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Budget::Count(n) => s.serialize_u32(*n),
            Budget::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Budget::Count(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(s: &str) -> BatchPlan {
        s.parse().unwrap()
    }

    #[test]
    fn sizes_follow_ansible_serial() {
        assert_eq!(plan("1,3,6").sizes(10), vec![1, 3, 6]);
        assert_eq!(plan("1,10%,50%,100%").sizes(100), vec![1, 10, 50, 39]);
        assert_eq!(plan("2").sizes(5), vec![2, 2, 1]);
        assert_eq!(plan("10%").sizes(5), vec![1, 1, 1, 1, 1]);
        assert_eq!(plan("1,3,6").sizes(3), vec![1, 2]);
        assert_eq!(plan("5").sizes(0), Vec::<usize>::new());
        assert_eq!(plan("1,3,6").assign(5), vec![0, 1, 1, 1, 2]);
    }

    #[test]
    fn bad_sizes_are_refused_with_the_reason() {
        assert!("0".parse::<BatchPlan>().unwrap_err().contains("at least 1"));
        assert!(
            "150%"
                .parse::<BatchPlan>()
                .unwrap_err()
                .contains("more than 100%")
        );
        assert!("x".parse::<BatchPlan>().is_err());
    }

    #[test]
    fn serde_forms() {
        #[derive(Deserialize)]
        struct S {
            batches: BatchPlan,
            budget: Budget,
        }
        let s: S = serde_json::from_str(r#"{"batches":[1,"10%"],"budget":"5%"}"#).unwrap();
        assert_eq!(s.batches, plan("1,10%"));
        assert_eq!(s.budget.allowed(40), 2);
        let s: S = serde_json::from_str(r#"{"batches":2,"budget":1}"#).unwrap();
        assert_eq!(s.batches, BatchPlan::serial(2));
        assert_eq!(
            serde_json::to_string(&plan("1,10%")).unwrap(),
            r#"[1,"10%"]"#
        );
    }
}
