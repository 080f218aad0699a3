//! Localities (`region/zone/subzone`) and the failover order between them.

use std::fmt;

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub fn new(region: &str, zone: &str, subzone: &str) -> Self {
        Self {
            region: region.to_owned(),
            zone: zone.to_owned(),
            subzone: subzone.to_owned(),
        }
    }

    /// Parses `region[/zone[/subzone]]`; an empty string is the unknown locality.
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = if s.is_empty() {
            vec![]
        } else {
            s.split('/').collect()
        };
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let get = |i: usize| parts.get(i).copied().unwrap_or_default();
        Some(Self::new(get(0), get(1), get(2)))
    }

    /// Failover priority of `self` seen from `from`: 0 same subzone, 1 same zone, 2 same
    /// region, 3 elsewhere. Lower is preferred.
    pub fn priority_from(&self, from: &Locality) -> u8 {
        if self.region != from.region || self.region.is_empty() {
            3
        } else if self.zone != from.zone || self.zone.is_empty() {
            2
        } else if self.subzone != from.subzone {
            1
        } else {
            0
        }
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.region)?;
        if !self.zone.is_empty() {
            write!(f, "/{}", self.zone)?;
        }
        if !self.subzone.is_empty() {
            write!(f, "/{}", self.subzone)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearer_localities_come_first() {
        let me = Locality::parse("us-east/zone-a").expect("valid");
        assert_eq!(
            Locality::parse("us-east/zone-a")
                .expect("valid")
                .priority_from(&me),
            0
        );
        assert_eq!(
            Locality::parse("us-east/zone-b")
                .expect("valid")
                .priority_from(&me),
            2
        );
        assert_eq!(
            Locality::parse("eu-central/zone-a")
                .expect("valid")
                .priority_from(&me),
            3
        );
    }

    #[test]
    fn rejects_malformed_localities() {
        assert!(Locality::parse("a//b").is_none());
        assert!(Locality::parse("a/b/c/d").is_none());
        assert_eq!(
            Locality::parse("").expect("empty is unknown"),
            Locality::default()
        );
    }
}
