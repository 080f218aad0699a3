//! `isthmus analyze`: every finding about a set of objects, with a severity, as
//! `istioctl analyze` reports them. Errors are faults that reject an object; warnings are
//! references to objects that do not exist (they apply once those arrive); infos are
//! deprecated fields (accepted and mapped) and documents that are not mesh config.

use std::fmt;

use super::load::{parse_documents, SourceFile};
use super::{validate, Code, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl std::str::FromStr for Severity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Ok(Severity::Info),
            "warning" | "warn" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            other => Err(format!(
                "`{other}` is not a severity (Info, Warning, Error)"
            )),
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "Info",
            Severity::Warning => "Warning",
            Severity::Error => "Error",
        })
    }
}

/// One finding, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// `file: document N (Kind ns/name): field: message [code]`, or a note.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<7} {}", self.severity, self.message)
    }
}

fn severity(e: &ConfigError) -> Severity {
    match e.code {
        Code::Deprecated => Severity::Info,
        c if c.is_warning() => Severity::Warning,
        _ => Severity::Error,
    }
}

/// Every finding about `files` taken as one config, most severe first.
pub fn analyze(files: &[SourceFile]) -> Vec<Finding> {
    let parsed = parse_documents(files);
    let (errors, notes) = (parsed.errors, parsed.notes);
    let admission = validate::build(parsed.documents);
    let mut findings: Vec<Finding> = errors
        .iter()
        .chain(&admission.rejected)
        .chain(&admission.warnings)
        .map(|e| Finding {
            severity: severity(e),
            message: e.to_string(),
        })
        .chain(notes.into_iter().map(|message| Finding {
            severity: Severity::Info,
            message,
        }))
        .collect();
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_carry_the_severity_of_what_they_do() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: demo}\nspec: {ports: [{port: 0}]}\n";
        let findings = analyze(&[SourceFile {
            name: "app.yaml".into(),
            contents: yaml.into(),
        }]);
        let severities: Vec<Severity> = findings.iter().map(|f| f.severity).collect();
        assert_eq!(
            severities,
            vec![
                Severity::Error,
                Severity::Warning,
                Severity::Warning,
                Severity::Info
            ],
            "{findings:#?}"
        );
        assert!(findings[0].message.contains("spec.ports[0].port"));
        assert!(findings[1].message.contains("no Service named `reviews`"));
        assert!(findings[3]
            .message
            .contains("Deployment (apps/v1) is not mesh config"));
    }
}
