//! Text for a terminal from values others chose: a policy rule's name is any string the CRD
//! lets through (a tenant writes it), and a line that carries one must not carry a newline
//! that forges the next line, or an escape sequence that rewrites the screen.

use std::borrow::Cow;

/// `s` with every control character written as an escape (`\n`, `\u{1b}`).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert!(matches!(printable("EgressPolicy/a/p#github"), Cow::Borrowed(_)));
        assert_eq!(printable("x\nteam-b/web allow\u{1b}[2J"), "x\\nteam-b/web allow\\u{1b}[2J");
        assert_eq!(printable("café ✓"), "café ✓");
    }
}
