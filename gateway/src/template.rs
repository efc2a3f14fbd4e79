//! `google.api.http` path templates: parsing and matching.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! Verb     = ":" LITERAL ;
//! ```

use percent_encoding::percent_decode_str;

/// A template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path template {template:?}: {reason}")]
pub struct TemplateError {
    /// The template text.
    pub template: String,
    /// What is wrong.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    Star,
    DoubleStar,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Var {
    /// Dotted field path, e.g. `vm.name`.
    field: String,
    /// The segment range it captures.
    start: usize,
    end: usize,
    /// Captures more than one segment (`**` or a multi-segment pattern): its
    /// value keeps `/` separators and an encoded `%2F` stays encoded.
    multi: bool,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segs: Vec<Seg>,
    vars: Vec<Var>,
    verb: Option<String>,
}

/// One captured variable: its field path and decoded value.
pub type Binding = (String, String);

impl PathTemplate {
    /// Parses a template such as `/v1/vms/{name}/start` or `/v1/{name=projects/*/vms/*}:start`.
    pub fn parse(text: &str) -> Result<PathTemplate, TemplateError> {
        let err = |reason| TemplateError { template: text.to_owned(), reason };
        let rest = text.strip_prefix('/').ok_or_else(|| err("must start with '/'"))?;
        // The verb is a ':' after the last '/' that is outside any variable.
        let (body, verb) = split_verb(rest).map_err(err)?;
        let mut segs = Vec::new();
        let mut vars: Vec<Var> = Vec::new();
        let mut chars = body;
        loop {
            if let Some(inner_and_rest) = chars.strip_prefix('{') {
                let close = inner_and_rest.find('}').ok_or_else(|| err("unclosed '{'"))?;
                let inner = &inner_and_rest[..close];
                let (field, pattern) = match inner.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (inner, "*"),
                };
                if field.is_empty()
                    || !field
                        .split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                {
                    return Err(err("bad field path in variable"));
                }
                if vars.iter().any(|v| v.field == field) {
                    return Err(err("variable bound twice"));
                }
                let start = segs.len();
                for p in pattern.split('/') {
                    segs.push(parse_seg(p).map_err(err)?);
                }
                let multi = segs.len() - start > 1 || segs[start] == Seg::DoubleStar;
                vars.push(Var { field: field.to_owned(), start, end: segs.len(), multi });
                chars = &inner_and_rest[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let piece = &chars[..end];
                if piece.contains('{') || piece.contains('}') {
                    return Err(err("a variable must be a whole segment"));
                }
                segs.push(parse_seg(piece).map_err(err)?);
                chars = &chars[end..];
            }
            match chars.strip_prefix('/') {
                Some(r) => chars = r,
                None if chars.is_empty() => break,
                None => return Err(err("unexpected character after variable")),
            }
        }
        let double = segs.iter().filter(|s| **s == Seg::DoubleStar).count();
        if double > 1 || (double == 1 && segs.last() != Some(&Seg::DoubleStar)) {
            return Err(err("'**' may only be the last segment"));
        }
        Ok(PathTemplate { text: text.to_owned(), segs, vars, verb: verb.map(str::to_owned) })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The field paths the template binds.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|v| v.field.as_str())
    }

    /// The segment at `i` as a literal, or the field path of the variable
    /// capturing it (`Some("")` for a bare `*` or `**` outside any
    /// variable), or `None` past the end. A trailing `**` covers every
    /// position from its own on.
    fn at(&self, i: usize) -> Option<Result<&str, &str>> {
        let idx = if i < self.segs.len() {
            i
        } else if self.segs.last() == Some(&Seg::DoubleStar) {
            self.segs.len() - 1
        } else {
            return None;
        };
        let field = self.vars.iter().find(|v| (v.start..v.end).contains(&idx)).map_or("", |v| v.field.as_str());
        Some(match &self.segs[idx] {
            Seg::Literal(l) => Ok(l.as_str()),
            Seg::Star | Seg::DoubleStar => Err(field),
        })
    }

    /// Where a path could match both templates with a literal segment of
    /// `self` taken by a variable of `other`: `(literal, other's field)` for
    /// each such position. Empty when no path matches both.
    pub fn captured_literals<'a>(&'a self, other: &'a PathTemplate) -> Vec<(&'a str, &'a str)> {
        if self.verb != other.verb {
            return Vec::new();
        }
        let open = |t: &PathTemplate| t.segs.last() == Some(&Seg::DoubleStar);
        let (la, lb) = (self.segs.len(), other.segs.len());
        // Without `**` both must have the same length; with one, the other
        // must reach at least up to it.
        let ok_len = match (open(self), open(other)) {
            (false, false) => la == lb,
            (true, false) => lb >= la,
            (false, true) => la >= lb,
            (true, true) => true,
        };
        if !ok_len {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in 0..la.max(lb) {
            match (self.at(i), other.at(i)) {
                (Some(Ok(a)), Some(Ok(b))) if a != b => return Vec::new(),
                (Some(Ok(a)), Some(Err(field))) => out.push((a, field)),
                _ => {}
            }
        }
        out
    }

    /// How many literal segments it has: more literals win over variables
    /// when two templates match (`/v1/users/me` before `/v1/users/{id}`).
    pub fn specificity(&self) -> usize {
        self.segs.iter().filter(|s| matches!(s, Seg::Literal(_))).count() + usize::from(self.verb.is_some())
    }

    /// Matches a request path (no query string); returns the bindings, or
    /// `None` when it does not match or a segment is not valid UTF-8.
    pub fn matches(&self, path: &str) -> Option<Vec<Binding>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(v) => {
                let (head, tail) = rest.rsplit_once(':')?;
                if tail != v || tail.contains('/') {
                    return None;
                }
                head
            }
            None => rest,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let ends_double = self.segs.last() == Some(&Seg::DoubleStar);
        let fixed = self.segs.len() - usize::from(ends_double);
        if parts.len() < fixed || (!ends_double && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segs.iter().zip(&parts) {
            match seg {
                Seg::Literal(l) if l != part => return None,
                Seg::Star if part.is_empty() => return None,
                _ => {}
            }
        }
        let mut out = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            let end = if v.end == self.segs.len() && ends_double { parts.len() } else { v.end };
            let captured = &parts[v.start..end];
            let value = if !v.multi {
                percent_decode_str(captured[0]).decode_utf8().ok()?.into_owned()
            } else {
                let mut decoded = Vec::with_capacity(captured.len());
                for c in captured {
                    decoded.push(
                        percent_decode_str(&c.replace("%2F", "%252F").replace("%2f", "%252f"))
                            .decode_utf8()
                            .ok()?
                            .into_owned(),
                    );
                }
                decoded.join("/")
            };
            out.push((v.field.clone(), value));
        }
        Some(out)
    }
}

fn split_verb(rest: &str) -> Result<(&str, Option<&str>), &'static str> {
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let last_close = rest.rfind('}').map_or(0, |i| i + 1);
    let from = last_slash.max(last_close);
    match rest[from..].find(':') {
        Some(i) => {
            let verb = &rest[from + i + 1..];
            if verb.is_empty() || verb.contains(['/', '{', '}', '*']) {
                return Err("bad verb");
            }
            Ok((&rest[..from + i], Some(verb)))
        }
        None => Ok((rest, None)),
    }
}

fn parse_seg(p: &str) -> Result<Seg, &'static str> {
    match p {
        "" => Err("empty segment"),
        "*" => Ok(Seg::Star),
        "**" => Ok(Seg::DoubleStar),
        l if l.contains(['*', '{', '}', '=']) => Err("bad literal segment"),
        l => Ok(Seg::Literal(l.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, p: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t).unwrap().matches(p)
    }

    #[test]
    fn literal_and_simple_variable() {
        assert_eq!(m("/v1/cluster/default-pool", "/v1/cluster/default-pool"), Some(vec![]));
        assert_eq!(m("/v1/cluster/default-pool", "/v1/cluster/default-pools"), None);
        assert_eq!(m("/v1/vms/{name}/start", "/v1/vms/web-1/start"), Some(vec![("name".into(), "web-1".into())]));
        assert_eq!(m("/v1/vms/{name}", "/v1/vms/"), None);
        assert_eq!(m("/v1/vms/{name}", "/v1/vms/a/b"), None);
    }

    #[test]
    fn percent_decoding_and_nested_fields() {
        assert_eq!(m("/v1/users/{user.id}", "/v1/users/a%20b"), Some(vec![("user.id".into(), "a b".into())]));
        assert_eq!(m("/v1/users/{id}", "/v1/users/%ff"), None);
    }

    #[test]
    fn multi_segment_and_double_star() {
        assert_eq!(
            m("/v1/{name=projects/*/vms/*}", "/v1/projects/p1/vms/v1"),
            Some(vec![("name".into(), "projects/p1/vms/v1".into())])
        );
        assert_eq!(m("/v1/{name=projects/*/vms/*}", "/v1/projects/p1/disks/v1"), None);
        assert_eq!(m("/v1/files/{path=**}", "/v1/files/a/b/c"), Some(vec![("path".into(), "a/b/c".into())]));
        assert_eq!(m("/v1/files/{path=**}", "/v1/files/a%2Fb"), Some(vec![("path".into(), "a%2Fb".into())]));
    }

    #[test]
    fn custom_verb() {
        assert_eq!(m("/v1/vms/{name}:start", "/v1/vms/a:start"), Some(vec![("name".into(), "a".into())]));
        assert_eq!(m("/v1/vms/{name}:start", "/v1/vms/a:stop"), None);
        assert_eq!(m("/v1/vms/{name}:start", "/v1/vms/a"), None);
        assert_eq!(m("/v1/vms:watch", "/v1/vms:watch"), Some(vec![]));
    }

    #[test]
    fn specificity_prefers_literals() {
        let me = PathTemplate::parse("/v1/users/me").unwrap();
        let id = PathTemplate::parse("/v1/users/{id}").unwrap();
        assert!(me.specificity() > id.specificity());
    }

    #[test]
    fn bad_templates_are_refused() {
        for t in ["v1/x", "/v1/{x", "/v1/a{b}", "/v1/{a}/{a}", "/v1/**/x", "/v1//x", "/v1/x:", "/v1/{a.}"] {
            assert!(PathTemplate::parse(t).is_err(), "{t}");
        }
    }
}
