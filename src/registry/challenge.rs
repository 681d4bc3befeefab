//! `WWW-Authenticate` challenges of backends (RFC 7235 auth-params; the Docker token flow of
//! distribution's `docs/spec/auth/token.md`).
//!
//! Only what regmux needs: the scheme (`Bearer` or `Basic`) and its parameters (`realm`, `service`,
//! `scope`, `error`). Multiple challenges in one header are not used by registries; the first is taken.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String>, error: Option<String> },
}

/// Parse one `WWW-Authenticate` header value. `None` when the scheme is unknown or a Bearer challenge
/// has no realm (there is then nowhere to ask for a token).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, params) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let (mut realm, mut service, mut scope, mut error) = (None, None, None, None);
    for (k, v) in params_iter(params) {
        match k.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(v),
            "service" => service = Some(v),
            "scope" => scope = Some(v),
            "error" => error = Some(v),
            _ => {}
        }
    }
    Some(Challenge::Bearer { realm: realm?, service, scope, error })
}

/// `k=v, k="quoted \"v\"", …` → pairs. Malformed input ends the iteration; it never panics.
fn params_iter(s: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let mut rest = s;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &q[end.unwrap_or(q.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        rest = remaining;
        Some((key, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_bearer() {
        let c = parse_challenge(
            r#"Bearer realm="http://127.0.0.1:1/token",service="lab-registry",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/token".into(),
                service: Some("lab-registry".into()),
                scope: Some("repository:library/alpine:pull".into()),
                error: None,
            })
        );
    }

    #[test]
    fn insufficient_scope_and_escapes() {
        let c = parse_challenge(r#"bearer realm="r\"x", error="insufficient_scope", service=svc"#).unwrap();
        match c {
            Challenge::Bearer { realm, service, error, .. } => {
                assert_eq!(realm, "r\"x");
                assert_eq!(service.as_deref(), Some("svc"));
                assert_eq!(error.as_deref(), Some("insufficient_scope"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_schemes() {
        assert_eq!(parse_challenge(r#"Basic realm="basic-realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None, "no realm");
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_some());
    }
}
