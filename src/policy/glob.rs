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

    /// Runs for every claim binding of every exchange, so it allocates nothing for values of
    /// up to [`ROWS_ON_STACK`] characters (every GitLab claim is shorter).
    pub fn matches(&self, value: &str) -> bool {
        if self.tokens.iter().all(|token| matches!(token, Token::Literal(_))) {
            return value == self.source;
        }
        let length = value.chars().count();
        let mut on_stack = [false; 2 * (ROWS_ON_STACK + 1)];
        let mut on_heap = Vec::new();
        let rows = if length <= ROWS_ON_STACK {
            &mut on_stack[..2 * (length + 1)]
        } else {
            on_heap.resize(2 * (length + 1), false);
            &mut on_heap[..]
        };
        // reachable[j]: the tokens seen so far can consume exactly the value's first j
        // characters. Two rows, swapped per token.
        let (mut reachable, mut next) = rows.split_at_mut(length + 1);
        reachable[0] = true;
        for token in &self.tokens {
            next.fill(false);
            match token {
                Token::Literal(expected) => {
                    for (j, c) in value.chars().enumerate() {
                        next[j + 1] = reachable[j] && c == *expected;
                    }
                }
                Token::Segment | Token::Any => {
                    let crosses_segments = matches!(token, Token::Any);
                    next[0] = reachable[0];
                    for (j, c) in value.chars().enumerate() {
                        next[j + 1] = reachable[j + 1] || (next[j] && (crosses_segments || c != '/'));
                    }
                }
            }
            std::mem::swap(&mut reachable, &mut next);
        }
        reachable[length]
    }
}

/// Characters of a claim value [`Glob::matches`] checks without allocating.
const ROWS_ON_STACK: usize = 256;

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

    /// The straightforward backtracking reading of the rules in the module's comment.
    fn reference(pattern: &[char], value: &[char]) -> bool {
        match pattern {
            [] => value.is_empty(),
            ['*', '*', rest @ ..] => (0..=value.len()).any(|taken| reference(rest, &value[taken..])),
            ['*', rest @ ..] => (0..=value.len()).take_while(|&taken| !value[..taken].contains(&'/')).any(|taken| reference(rest, &value[taken..])),
            [literal, rest @ ..] => value.first() == Some(literal) && reference(rest, &value[1..]),
        }
    }

    proptest::proptest! {
        /// Values past the stack rows (300 characters) take the heap path and must agree too.
        #[test]
        fn agrees_with_backtracking(pattern in "[ab/*é]{0,8}", value in "[ab/é]{0,12}", padding in 0usize..300) {
            let (pattern, value) = if padding > 0 { (format!("**/{pattern}"), format!("{}{value}", "a/".repeat(padding / 2))) } else { (pattern, value) };
            // Each star multiplies the reference's backtracking by the value's length.
            proptest::prop_assume!(!pattern.contains("***") && pattern.matches('*').count() <= 4);
            let chars = |text: &str| text.chars().collect::<Vec<_>>();
            proptest::prop_assert_eq!(Glob::parse(&pattern).unwrap().matches(&value), reference(&chars(&pattern), &chars(&value)), "{} against {}", pattern, value);
        }
    }
}
