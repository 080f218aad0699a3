//! The part of CEL (Common Expression Language) that Istio's access log filters are written
//! in (`Telemetry.accessLogging[].filter.expression`), over Envoy's request attributes:
//! `response.code >= 400`, `request.headers['x-debug'] == 'on'`,
//! `!request.url_path.startsWith('/healthz') && request.duration > duration('1s')`.
//!
//! Supported: literals (integers, 'strings' and "strings", `true`/`false`,
//! `duration('1.5s')`), the attributes of [`Attr`], `request.headers['name']`, the
//! comparisons `==`, `!=`, `<`, `<=`, `>`, `>=`, the logic `&&`, `||`, `!`, parentheses,
//! `in [a, b]`, the string methods `startsWith`, `endsWith`, `contains` and `matches`, and
//! `has(request.headers['name'])`. Anything else is refused
//! when the filter is checked, naming what is not supported, so a filter never silently
//! means something else. As in Envoy, an expression that cannot be evaluated (a header
//! that is absent, a comparison of different types) does not match.

use std::time::Duration;

/// An attribute a filter can read, by Envoy's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    ResponseCode,
    ResponseGrpcStatus,
    ResponseFlags,
    ResponseSize,
    RequestMethod,
    /// `request.path`: path and query.
    RequestPath,
    /// `request.url_path`: path without query.
    RequestUrlPath,
    RequestHost,
    RequestScheme,
    RequestProtocol,
    RequestId,
    RequestUserAgent,
    RequestSize,
    RequestDuration,
    RequestHeader(String),
    ConnectionMtls,
    SourcePrincipal,
    SourceNamespace,
    SourceWorkload,
    DestinationService,
    DestinationWorkload,
    DestinationNamespace,
}

impl Attr {
    fn named(path: &str) -> Option<Self> {
        Some(match path {
            "response.code" => Attr::ResponseCode,
            "response.grpc_status" => Attr::ResponseGrpcStatus,
            "response.flags" => Attr::ResponseFlags,
            "response.size" | "response.total_size" => Attr::ResponseSize,
            "request.method" => Attr::RequestMethod,
            "request.path" => Attr::RequestPath,
            "request.url_path" => Attr::RequestUrlPath,
            "request.host" => Attr::RequestHost,
            "request.scheme" => Attr::RequestScheme,
            "request.protocol" => Attr::RequestProtocol,
            "request.id" => Attr::RequestId,
            "request.useragent" => Attr::RequestUserAgent,
            "request.size" | "request.total_size" => Attr::RequestSize,
            "request.duration" => Attr::RequestDuration,
            "connection.mtls" => Attr::ConnectionMtls,
            "source.principal" | "connection.uri_san_peer_certificate" => Attr::SourcePrincipal,
            "source.namespace" => Attr::SourceNamespace,
            "source.workload.name" => Attr::SourceWorkload,
            "destination.service.host" => Attr::DestinationService,
            "destination.workload.name" => Attr::DestinationWorkload,
            "destination.namespace" => Attr::DestinationNamespace,
            _ => return None,
        })
    }
}

/// A value in an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Str(String),
    Bool(bool),
    Duration(Duration),
    /// Absent, or an error: matches nothing.
    Missing,
}

/// What a filter reads its attributes from.
pub trait Attributes {
    fn get(&self, attr: &Attr) -> Value;
}

#[derive(Debug, Clone)]
enum Expr {
    Lit(Value),
    Attr(Attr),
    Has(Attr),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(Cmp, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Vec<Expr>),
    Method(Method, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
enum Method {
    StartsWith,
    EndsWith,
    Contains,
    /// The pattern, compiled once when it is a literal.
    Matches(Option<regex::Regex>),
}

/// A checked filter expression.
#[derive(Debug, Clone)]
pub struct Filter {
    expr: Expr,
    text: String,
}

/// Longest filter accepted, and deepest nesting: a filter is config, not a program.
const MAX_LEN: usize = 4096;
const MAX_DEPTH: usize = 32;

impl Filter {
    /// Parses `text`; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_LEN {
            return Err(format!("longer than {MAX_LEN} characters"));
        }
        let tokens = lex(text)?;
        let mut p = Parser {
            tokens,
            at: 0,
            depth: 0,
        };
        let expr = p.or()?;
        if let Some(t) = p.tokens.get(p.at) {
            return Err(format!("unexpected `{}` after the expression", t.show()));
        }
        Ok(Self {
            expr,
            text: text.to_owned(),
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The request headers it reads (`request.headers['name']`), lower-case.
    pub fn headers(&self) -> impl Iterator<Item = &str> {
        let mut out = Vec::new();
        collect_headers(&self.expr, &mut out);
        out.into_iter()
    }

    /// Whether the request `a` describes passes the filter.
    pub fn matches(&self, a: &dyn Attributes) -> bool {
        eval(&self.expr, a) == Value::Bool(true)
    }
}

fn collect_headers<'a>(e: &'a Expr, out: &mut Vec<&'a str>) {
    match e {
        Expr::Attr(Attr::RequestHeader(h)) | Expr::Has(Attr::RequestHeader(h)) => out.push(h),
        Expr::Lit(_) | Expr::Attr(_) | Expr::Has(_) => {}
        Expr::Not(x) => collect_headers(x, out),
        Expr::And(l, r) | Expr::Or(l, r) | Expr::Cmp(_, l, r) | Expr::Method(_, l, r) => {
            collect_headers(l, out);
            collect_headers(r, out);
        }
        Expr::In(x, list) => {
            collect_headers(x, out);
            list.iter().for_each(|i| collect_headers(i, out));
        }
    }
}

fn eval(e: &Expr, a: &dyn Attributes) -> Value {
    match e {
        Expr::Lit(v) => v.clone(),
        Expr::Attr(attr) => a.get(attr),
        Expr::Has(attr) => Value::Bool(a.get(attr) != Value::Missing),
        Expr::Not(x) => match eval(x, a) {
            Value::Bool(b) => Value::Bool(!b),
            _ => Value::Missing,
        },
        // CEL's logic: a definite answer on one side wins over an error on the other.
        Expr::And(l, r) => match (eval(l, a), eval(r, a)) {
            (Value::Bool(false), _) | (_, Value::Bool(false)) => Value::Bool(false),
            (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
            _ => Value::Missing,
        },
        Expr::Or(l, r) => match (eval(l, a), eval(r, a)) {
            (Value::Bool(true), _) | (_, Value::Bool(true)) => Value::Bool(true),
            (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
            _ => Value::Missing,
        },
        Expr::Cmp(op, l, r) => compare(*op, &eval(l, a), &eval(r, a)),
        Expr::In(x, list) => {
            let v = eval(x, a);
            if v == Value::Missing {
                return Value::Missing;
            }
            Value::Bool(list.iter().any(|item| eval(item, a) == v))
        }
        Expr::Method(m, target, arg) => match (eval(target, a), eval(arg, a)) {
            (Value::Str(s), Value::Str(p)) => Value::Bool(match m {
                Method::StartsWith => s.starts_with(&p),
                Method::EndsWith => s.ends_with(&p),
                Method::Contains => s.contains(&p),
                Method::Matches(Some(re)) => re.is_match(&s),
                Method::Matches(None) => match regex::Regex::new(&p) {
                    Ok(re) => re.is_match(&s),
                    Err(_) => return Value::Missing,
                },
            }),
            _ => Value::Missing,
        },
    }
}

fn compare(op: Cmp, l: &Value, r: &Value) -> Value {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (l, r) {
        (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        (Value::Duration(a), Value::Duration(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) if matches!(op, Cmp::Eq | Cmp::Ne) => Some(a.cmp(b)),
        _ => None,
    };
    let Some(ord) = ord else {
        return Value::Missing;
    };
    Value::Bool(match op {
        Cmp::Eq => ord == Ordering::Equal,
        Cmp::Ne => ord != Ordering::Equal,
        Cmp::Lt => ord == Ordering::Less,
        Cmp::Le => ord != Ordering::Greater,
        Cmp::Gt => ord == Ordering::Greater,
        Cmp::Ge => ord != Ordering::Less,
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Int(i64),
    Str(String),
    Op(&'static str),
}

impl Token {
    fn show(&self) -> String {
        match self {
            Token::Ident(s) => s.clone(),
            Token::Int(n) => n.to_string(),
            Token::Str(s) => format!("'{s}'"),
            Token::Op(o) => (*o).to_owned(),
        }
    }
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    const OPS: [&str; 17] = [
        "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", "[", "]", ".", ",", "-", "?",
    ];
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'\'' || c == b'"' {
            let end = text[i + 1..]
                .find(c as char)
                .ok_or_else(|| format!("unterminated string at character {i}"))?;
            out.push(Token::Str(text[i + 1..i + 1 + end].to_owned()));
            i += end + 2;
        } else if c.is_ascii_digit() {
            let len = b[i..].iter().take_while(|d| d.is_ascii_digit()).count();
            let n = text[i..i + len]
                .parse()
                .map_err(|_| format!("number too large at character {i}"))?;
            out.push(Token::Int(n));
            i += len;
            // CEL's unsigned suffix: `200u`.
            if b.get(i) == Some(&b'u') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let len = b[i..]
                .iter()
                .take_while(|d| d.is_ascii_alphanumeric() || **d == b'_')
                .count();
            out.push(Token::Ident(text[i..i + len].to_owned()));
            i += len;
        } else if let Some(op) = OPS.iter().find(|o| text[i..].starts_with(**o)) {
            if *op == "?" {
                return Err("the conditional operator `? :` is not supported".into());
            }
            out.push(Token::Op(op));
            i += op.len();
        } else {
            return Err(format!(
                "unexpected `{}` at character {i}",
                text[i..].chars().next().unwrap_or(' ')
            ));
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn eat(&mut self, op: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Op(o)) if *o == op);
        self.at += usize::from(found);
        found
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.eat(op) {
            Ok(())
        } else {
            Err(match self.peek() {
                Some(t) => format!("expected `{op}`, found `{}`", t.show()),
                None => format!("expected `{op}` at the end"),
            })
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH}"));
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.relation()?;
        while self.eat("&&") {
            l = Expr::And(Box::new(l), Box::new(self.relation()?));
        }
        Ok(l)
    }

    fn relation(&mut self) -> Result<Expr, String> {
        let l = self.unary()?;
        for (op, cmp) in [
            ("==", Cmp::Eq),
            ("!=", Cmp::Ne),
            ("<=", Cmp::Le),
            (">=", Cmp::Ge),
            ("<", Cmp::Lt),
            (">", Cmp::Gt),
        ] {
            if self.eat(op) {
                return Ok(Expr::Cmp(cmp, Box::new(l), Box::new(self.unary()?)));
            }
        }
        if self.peek() == Some(&Token::Ident("in".into())) {
            self.at += 1;
            self.expect("[")?;
            let mut list = Vec::new();
            if !self.eat("]") {
                loop {
                    list.push(self.unary()?);
                    if self.eat("]") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
            return Ok(Expr::In(Box::new(l), list));
        }
        Ok(l)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return self.nested(|p| Ok(Expr::Not(Box::new(p.unary()?))));
        }
        if self.eat("-") {
            return match self.peek().cloned() {
                Some(Token::Int(n)) => {
                    self.at += 1;
                    Ok(Expr::Lit(Value::Int(-n)))
                }
                _ => Err("`-` is only supported before a number".into()),
            };
        }
        let mut e = self.primary()?;
        while self.eat(".") {
            let Some(Token::Ident(name)) = self.peek().cloned() else {
                return Err("expected a method name after `.`".into());
            };
            self.at += 1;
            let method = match name.as_str() {
                "startsWith" => Method::StartsWith,
                "endsWith" => Method::EndsWith,
                "contains" => Method::Contains,
                "matches" => Method::Matches(None),
                other => {
                    return Err(format!(
                    "method `{other}` is not supported (startsWith, endsWith, contains, matches)"
                ))
                }
            };
            self.expect("(")?;
            let arg = self.nested(|p| p.or())?;
            self.expect(")")?;
            let method = match (&method, &arg) {
                (Method::Matches(_), Expr::Lit(Value::Str(p))) => Method::Matches(Some(
                    regex::Regex::new(p)
                        .map_err(|e| format!("`{p}` is not a regular expression: {e}"))?,
                )),
                _ => method,
            };
            e = Expr::Method(method, Box::new(e), Box::new(arg));
        }
        Ok(e)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some(t) = self.peek().cloned() else {
            return Err("the expression ends too early".into());
        };
        self.at += 1;
        match t {
            Token::Int(n) => Ok(Expr::Lit(Value::Int(n))),
            Token::Str(s) => Ok(Expr::Lit(Value::Str(s))),
            Token::Op("(") => {
                let e = self.nested(|p| p.or())?;
                self.expect(")")?;
                Ok(e)
            }
            Token::Ident(id) => match id.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "duration" => {
                    self.expect("(")?;
                    let Some(Token::Str(d)) = self.peek().cloned() else {
                        return Err("duration() takes a string like '1.5s'".into());
                    };
                    self.at += 1;
                    self.expect(")")?;
                    let ms = crate::config::parse_duration_ms(&d)
                        .ok_or_else(|| format!("`{d}` is not a duration like 1.5s or 200ms"))?;
                    Ok(Expr::Lit(Value::Duration(Duration::from_millis(ms))))
                }
                "has" => {
                    self.expect("(")?;
                    let Expr::Attr(attr) = self.attribute(String::new())? else {
                        return Err("has() takes an attribute".into());
                    };
                    self.expect(")")?;
                    Ok(Expr::Has(attr))
                }
                _ => self.attribute(id),
            },
            Token::Op(o) => Err(format!("unexpected `{o}`")),
        }
    }

    /// A dotted attribute name whose first part is `first` (read next when empty), and a
    /// header index.
    fn attribute(&mut self, first: String) -> Result<Expr, String> {
        let mut path = first;
        if path.is_empty() {
            match self.peek().cloned() {
                Some(Token::Ident(id)) => {
                    self.at += 1;
                    path = id;
                }
                _ => return Err("expected an attribute".into()),
            }
        }
        // Dots join the attribute's name until it names one (a method may follow).
        while Attr::named(&path).is_none() && path != "request.headers" {
            if !matches!(self.peek(), Some(Token::Op("."))) {
                return Err(format!(
                    "`{path}` is not an attribute Isthmus reads (response.code, \
                     request.method, request.url_path, request.headers['name'], ...)"
                ));
            }
            let Some(Token::Ident(next)) = self.tokens.get(self.at + 1).cloned() else {
                return Err(format!("`{path}.` must be followed by a name"));
            };
            self.at += 2;
            path = format!("{path}.{next}");
        }
        if path == "request.headers" {
            self.expect("[")?;
            let Some(Token::Str(name)) = self.peek().cloned() else {
                return Err("request.headers[...] takes a header name in quotes".into());
            };
            self.at += 1;
            self.expect("]")?;
            return Ok(Expr::Attr(Attr::RequestHeader(name.to_ascii_lowercase())));
        }
        Ok(Expr::Attr(Attr::named(&path).expect("checked above")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req {
        code: i64,
        path: &'static str,
        header: Option<&'static str>,
        duration_ms: u64,
    }

    impl Attributes for Req {
        fn get(&self, attr: &Attr) -> Value {
            match attr {
                Attr::ResponseCode => Value::Int(self.code),
                Attr::RequestUrlPath => Value::Str(self.path.into()),
                Attr::RequestMethod => Value::Str("GET".into()),
                Attr::RequestDuration => Value::Duration(Duration::from_millis(self.duration_ms)),
                Attr::RequestHeader(h) if h == "x-debug" => {
                    self.header.map_or(Value::Missing, |v| Value::Str(v.into()))
                }
                _ => Value::Missing,
            }
        }
    }

    fn req(code: i64, path: &'static str, header: Option<&'static str>) -> Req {
        Req {
            code,
            path,
            header,
            duration_ms: 5,
        }
    }

    #[test]
    fn istio_s_filters_select_what_they_say() {
        let cases: [(&str, Req, bool); 12] = [
            ("response.code >= 400", req(503, "/", None), true),
            ("response.code >= 400", req(200, "/", None), false),
            (
                "response.code >= 500 || request.headers['x-debug'] == 'on'",
                req(200, "/", Some("on")),
                true,
            ),
            (
                "response.code >= 500 || request.headers['X-Debug'] == 'on'",
                req(200, "/", None),
                false,
            ),
            (
                "!request.url_path.startsWith('/healthz')",
                req(200, "/healthz/ready", None),
                false,
            ),
            (
                "!request.url_path.startsWith('/healthz')",
                req(200, "/api", None),
                true,
            ),
            (
                "has(request.headers['x-debug'])",
                req(200, "/", Some("")),
                true,
            ),
            (
                "request.method in ['POST', 'PUT']",
                req(200, "/", None),
                false,
            ),
            (
                "response.code == 200 && request.url_path.matches('^/api/v[0-9]+')",
                req(200, "/api/v2/x", None),
                true,
            ),
            (
                "request.duration > duration('1s')",
                req(200, "/", None),
                false,
            ),
            // An absent header is no match, and not an error for the rest.
            (
                "request.headers['x-debug'] == 'on' || response.code == 404",
                req(404, "/", None),
                true,
            ),
            (
                "(response.code > 299) && (response.code < 400)",
                req(302, "/", None),
                true,
            ),
        ];
        for (text, r, want) in cases {
            let f = Filter::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(f.matches(&r), want, "{text}");
        }
    }

    #[test]
    fn what_is_not_supported_is_named() {
        for (text, says) in [
            ("response.code >=", "ends too early"),
            (
                "xds.cluster_name == 'BlackHoleCluster'",
                "`xds.cluster_name` is not an attribute",
            ),
            ("request.url_path.size() > 3", "method `size`"),
            ("response.code > 1 ? true : false", "conditional"),
            ("request.headers[x]", "header name in quotes"),
            ("response.code >= 400 )", "unexpected `)`"),
            ("request.url_path.matches('(')", "regular expression"),
            ("'abc", "unterminated"),
        ] {
            let e = Filter::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
        let deep = format!("{}true{}", "(".repeat(40), ")".repeat(40));
        assert!(Filter::parse(&deep).expect_err("deep").contains("nested"));
    }
}
