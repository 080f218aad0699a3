//! Request path normalization, as Istio's `meshConfig.pathNormalization` does it (Envoy's
//! `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`). Routes match
//! the normalized path, and the application receives it, so `/x/../admin` cannot slip past
//! a rule for `/admin`.
//!
//! - `BASE` (the default): percent-decodes the unreserved characters (`A-Z a-z 0-9 - . _ ~`),
//!   writes the hex of other escapes in upper case, turns `\` into `/`, and removes dot
//!   segments (RFC 3986 §5.2.4). `%2F` and `%5C` stay as they are.
//! - `MERGE_SLASHES`: `BASE`, then runs of `/` become one.
//! - `DECODE_AND_MERGE_SLASHES`: `%2F` / `%5C` (either case) are decoded first, then
//!   `MERGE_SLASHES`.
//! - `NONE`: the path is left as it came.
//!
//! Under every mode but `NONE` a path that is not origin-form (does not start with `/`),
//! holds `%00` or a fragment, or an escape that is not two hex digits is refused.
//! The query is never touched.

use std::fmt;

/// Istio's `pathNormalization.normalization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalization {
    None,
    #[default]
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl std::str::FromStr for Normalization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "NONE" => Ok(Self::None),
            "BASE" | "DEFAULT" => Ok(Self::Base),
            "MERGE_SLASHES" => Ok(Self::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(Self::DecodeAndMergeSlashes),
            other => Err(format!(
                "`{other}` is not a path normalization (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)"
            )),
        }
    }
}

impl fmt::Display for Normalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        })
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotOriginForm,
    #[error("the path holds an encoded NUL (%00)")]
    EncodedNul,
    #[error("the path holds a fragment (`#`)")]
    Fragment,
    #[error("the path holds a malformed percent escape")]
    BadEscape,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes the escapes a mode decodes, upper-cases the rest, and turns `\` into `/`.
fn decode(path: &str, slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (hi, lo) = match (bytes.get(i + 1).copied(), bytes.get(i + 2).copied()) {
                (Some(h), Some(l)) => (hex(h), hex(l)),
                _ => (None, None),
            };
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEscape);
            };
            let c = hi << 4 | lo;
            match c {
                0 => return Err(PathError::EncodedNul),
                c if unreserved(c) => out.push(c as char),
                b'/' | b'\\' if slashes => out.push('/'),
                c => {
                    out.push('%');
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(c >> 4)]));
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(c & 15)]));
                }
            }
            i += 3;
            continue;
        }
        match b {
            b'\\' => out.push('/'),
            b'#' => return Err(PathError::Fragment),
            _ => out.push(char::from(b)),
        }
        i += 1;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path[1..].split('/').collect();
    let last = parts.len() - 1;
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if i == last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Normalizes `path` (without the query) under `mode`. Returns `None` when nothing changed.
pub fn normalize(path: &str, mode: Normalization) -> Result<Option<String>, PathError> {
    if mode == Normalization::None {
        return Ok(None);
    }
    if !path.starts_with(['/', '\\']) {
        return Err(PathError::NotOriginForm);
    }
    // The common case: nothing to decode, no dot segment, no doubled slash.
    let needs_work = path.bytes().any(|b| matches!(b, b'%' | b'\\' | b'#'))
        || path.contains("/.")
        || (mode != Normalization::Base && path.contains("//"));
    if !needs_work {
        return Ok(None);
    }
    let decoded = decode(path, mode == Normalization::DecodeAndMergeSlashes)?;
    let mut out = remove_dot_segments(&decoded);
    if mode != Normalization::Base {
        out = merge_slashes(&out);
    }
    Ok((out != path).then_some(out))
}

/// Normalizes the path of a `path?query` target, keeping the query as it came.
pub fn normalize_target(target: &str, mode: Normalization) -> Result<Option<String>, PathError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    Ok(normalize(path, mode)?.map(|p| match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    }))
}

#[cfg(test)]
mod tests {
    use super::Normalization::*;
    use super::*;

    fn norm(path: &str, mode: Normalization) -> Result<String, PathError> {
        normalize(path, mode).map(|p| p.unwrap_or_else(|| path.to_owned()))
    }

    #[test]
    fn normalizes_as_istio_documents() {
        // (input, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
        let table = [
            ("/admin", "/admin", "/admin", "/admin"),
            ("/x/../admin", "/admin", "/admin", "/admin"),
            ("/./admin", "/admin", "/admin", "/admin"),
            ("/x/%2e%2e/admin", "/admin", "/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin", "/admin", "/admin"),
            ("/x/.%2e/admin", "/admin", "/admin", "/admin"),
            ("/a/../b", "/b", "/b", "/b"),
            ("/a/./b/.", "/a/b/", "/a/b/", "/a/b/"),
            ("/a/b/..", "/a/", "/a/", "/a/"),
            ("/../../a", "/a", "/a", "/a"),
            ("/..", "/", "/", "/"),
            ("\\da", "/da", "/da", "/da"),
            ("/a\\..\\b", "/b", "/b", "/b"),
            ("/a//b", "/a//b", "/a/b", "/a/b"),
            ("//admin", "//admin", "/admin", "/admin"),
            ("/a%2fb", "/a%2Fb", "/a%2Fb", "/a/b"),
            ("/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"),
            ("/a%5cb", "/a%5Cb", "/a%5Cb", "/a/b"),
            ("/x/..%2fadmin", "/x/..%2Fadmin", "/x/..%2Fadmin", "/admin"),
            ("/%41%42%7e%5f", "/AB~_", "/AB~_", "/AB~_"),
            ("/%20x%3f", "/%20x%3F", "/%20x%3F", "/%20x%3F"),
            ("/a/...", "/a/...", "/a/...", "/a/..."),
            ("/a/.b", "/a/.b", "/a/.b", "/a/.b"),
        ];
        for (input, base, merge, decode) in table {
            assert_eq!(norm(input, Base).as_deref(), Ok(base), "BASE {input}");
            assert_eq!(
                norm(input, MergeSlashes).as_deref(),
                Ok(merge),
                "MERGE_SLASHES {input}"
            );
            assert_eq!(
                norm(input, DecodeAndMergeSlashes).as_deref(),
                Ok(decode),
                "DECODE_AND_MERGE_SLASHES {input}"
            );
            assert_eq!(norm(input, None).as_deref(), Ok(input), "NONE");
        }
    }

    #[test]
    fn refuses_what_cannot_be_normalized() {
        assert_eq!(norm("/a%00b", Base), Err(PathError::EncodedNul));
        assert_eq!(norm("/a%zzb", Base), Err(PathError::BadEscape));
        assert_eq!(norm("/a%2", Base), Err(PathError::BadEscape));
        assert_eq!(norm("/a#frag", Base), Err(PathError::Fragment));
        assert_eq!(norm("*", Base), Err(PathError::NotOriginForm));
        assert_eq!(norm("a/b", MergeSlashes), Err(PathError::NotOriginForm));
    }

    #[test]
    fn keeps_the_query_and_reports_no_change() {
        assert_eq!(
            normalize_target("/x/../a?p=../b%2e", Base),
            Ok(Some("/a?p=../b%2e".into()))
        );
        assert_eq!(normalize_target("/a/b?x=1", Base), Ok(Option::None));
        assert_eq!(normalize("/a//b", Base), Ok(Option::None));
    }

    #[test]
    fn modes_parse_by_istio_name() {
        assert_eq!(
            "decode_and_merge_slashes".parse(),
            Ok(DecodeAndMergeSlashes)
        );
        assert!("LOOSE".parse::<Normalization>().is_err());
    }
}
