//! Claim patterns: `*` matches within one `/`-separated segment, `**` across segments,
//! everything else is literal, and a pattern always matches the whole value (anchored).

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `*`: any run of characters except `/`.
    Segment,
    /// `**`: any run of characters, `/` included.
    Any,
}

#[derive(Debug, Clone)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
}

impl Glob {
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.contains("***") {
            return Err(format!("pattern {source:?} has `***`; use `*` (one segment) or `**` (any depth)"));
        }
        let mut tokens = Vec::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '*' {
                tokens.push(Token::Literal(c));
            } else if chars.peek() == Some(&'*') {
                chars.next();
                tokens.push(Token::Any);
            } else {
                tokens.push(Token::Segment);
            }
        }
        Ok(Self { source: source.to_owned(), tokens })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern pins down something: a binding of `**` to a project claim
    /// would scope a role to every project.
    pub fn has_literal(&self) -> bool {
        self.tokens.iter().any(|t| matches!(t, Token::Literal(c) if *c != '/'))
    }

    pub fn matches(&self, value: &str) -> bool {
        let value: Vec<char> = value.chars().collect();
        // reachable[j]: the tokens seen so far can consume exactly value[..j]. Two rows,
        // swapped per token: this runs for every claim pattern of every exchange.
        let mut reachable = vec![false; value.len() + 1];
        let mut next = vec![false; value.len() + 1];
        reachable[0] = true;
        for token in &self.tokens {
            next.fill(false);
            match token {
                Token::Literal(expected) => {
                    for j in 0..value.len() {
                        if reachable[j] && value[j] == *expected {
                            next[j + 1] = true;
                        }
                    }
                }
                Token::Segment | Token::Any => {
                    let crosses_segments = matches!(token, Token::Any);
                    for j in 0..=value.len() {
                        if !reachable[j] && !(j > 0 && next[j - 1] && (crosses_segments || value[j - 1] != '/')) {
                            continue;
                        }
                        next[j] = true;
                    }
                }
            }
            std::mem::swap(&mut reachable, &mut next);
        }
        reachable[value.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;

    fn matches(pattern: &str, value: &str) -> bool {
        Glob::parse(pattern).unwrap().matches(value)
    }

    #[test]
    fn literal_patterns_are_anchored() {
        assert!(matches("main", "main"));
        assert!(!matches("main", "main2"));
        assert!(!matches("main", "xmain"));
        assert!(!matches("main", ""));
    }

    #[test]
    fn single_star_stays_within_a_segment() {
        assert!(matches("group/*", "group/app"));
        assert!(matches("group/*", "group/"));
        assert!(!matches("group/*", "group/sub/app"));
        assert!(matches("release/*-rc", "release/1.2-rc"));
        assert!(!matches("release/*-rc", "release/a/b-rc"));
        assert!(matches("*", "anything-without-slash"));
        assert!(!matches("*", "a/b"));
    }

    #[test]
    fn double_star_crosses_segments() {
        assert!(matches("group/**", "group/sub/app"));
        assert!(matches("group/**", "group/app"));
        assert!(!matches("group/**", "other/app"));
        assert!(matches("**/deploy", "a/b/c/deploy"));
        assert!(matches("a/**/z", "a/b/c/z"));
        assert!(!matches("group/**", "groupie/app"));
    }

    #[test]
    fn literal_detection_for_scoping() {
        assert!(!Glob::parse("**").unwrap().has_literal());
        assert!(!Glob::parse("*/*").unwrap().has_literal());
        assert!(Glob::parse("group/*").unwrap().has_literal());
        assert!(Glob::parse("***").is_err());
    }
}
